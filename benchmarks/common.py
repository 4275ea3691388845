"""What every benchmark script shares: a fresh output folder and a report written twice (Markdown
for people, JSON for tools)."""

import json
import pathlib
import sys


def fresh_workdir(path: str) -> pathlib.Path:
  """`path`, created; refused when it already holds something (a benchmark never overwrites)."""
  out = pathlib.Path(path).resolve()
  if out.exists() and any(out.iterdir()):
    sys.exit(f"error: --workdir {out} is not empty; choose a new one")
  out.mkdir(parents=True, exist_ok=True)
  return out


def write_report(out: pathlib.Path, lines: list[str], results: dict) -> None:
  """OUT/report.md (and printed) and OUT/report.json."""
  (out / "report.md").write_text("\n".join(lines) + "\n")
  (out / "report.json").write_text(json.dumps(results, indent=2))
  print("\n".join(lines))
