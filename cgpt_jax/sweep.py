"""Sweeps: an experiment file that defines `get_sweep(arg)` is run point by point, each point in its
own launch.py process (the device count is fixed when a process starts), in sequence, resumably.

The contract with experiment files:
  get_sweep(arg) -> list[dict]: one dict per point. Reserved keys: `name` (unique; letters, digits,
      `-`, `_`, `.`), `devices` (default: launch.py's --devices), `mode` (`train` or `plan`), and
      `config_arg` (the :ARG of the config file for this point; default the sweep's own). Every
      other key is a config override, applied as --config.KEY=VALUE.
  report(sweep, results, workdir) -> list[str], optional: the Markdown body of WORKDIR/report.md;
      it may write plots to WORKDIR/*.png. `results[name]` is the point's summary.json (train, with
      its metrics.jsonl records under "metrics") or plan.json (plan), or {"error": message}.

With launch.py's `--results FILE` the report is also written to FILE (the docs' results tables,
docs/results/NAME.md), headed by the command that regenerates it, with the plots it links copied
beside it (report.write_results): rerunning that command refreshes the file.

WORKDIR/points/NAME/ is each point's run directory, with `point.json` (what was asked) and
`log.txt`. A point is finished when its result file exists and point.json matches the point as now
defined; finished points are skipped, so rerunning the command resumes an interrupted sweep. A
failed point is reported and the sweep goes on; its next attempt starts afresh (or resumes from its
checkpoints).
"""

import dataclasses
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time
from types import ModuleType

from cgpt_jax import report as report_lib
from cgpt_jax.errors import InputError

RESERVED = ("name", "devices", "mode", "config_arg")
MODES = ("train", "plan")
RESULT_FILE = {"train": "summary.json", "plan": "plan.json"}
RUN_MARKER = ".cgpt_run"  # as train.RUN_MARKER (train imports jax, which this process must not)
LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch.py"


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  devices: int
  mode: str
  config_arg: str | None
  overrides: dict

  def record(self, common: dict) -> dict:
    """What point.json holds: enough to tell whether a finished point is still the one asked for."""
    return {**dataclasses.asdict(self), "common_overrides": common}


def split_config_name(config_name: str) -> tuple[str, str | None]:
  """'experiments/x.py:ARG' -> ('experiments/x.py', 'ARG'); no ARG -> None."""
  path, sep, arg = config_name.rpartition(":")
  return (path, arg) if sep and path.endswith(".py") else (config_name, None)


def load_experiment(path: str) -> ModuleType:
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def points(module: ModuleType, arg: str | None, default_devices: int) -> list[Point]:
  """The experiment's get_sweep(arg), checked: a bad point is an InputError naming it."""
  where = f"{module.__file__}: get_sweep"
  raw = module.get_sweep(arg)
  if not isinstance(raw, (list, tuple)) or not raw:
    raise InputError(
      f"{where} returned {type(raw).__name__}; it must return a non-empty list of "
      "dicts, one per point."
    )
  result, seen = [], set()
  for i, p in enumerate(raw):
    if not isinstance(p, dict) or not isinstance(p.get("name"), str):
      raise InputError(f"{where}: point {i} must be a dict with a string 'name', got {p!r}.")
    name = p["name"]
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
      raise InputError(
        f"{where}: point name {name!r} is not a folder name; use letters, digits, "
        "'-', '_' and '.' only."
      )
    if name in seen:
      raise InputError(f"{where}: two points are named {name!r}; names must be unique.")
    seen.add(name)
    mode, devices = p.get("mode", "train"), p.get("devices", default_devices)
    if mode not in MODES:
      raise InputError(
        f"{where}: point {name!r} has mode {mode!r}; choose one of {', '.join(MODES)}."
      )
    if not isinstance(devices, int) or devices < 1:
      raise InputError(f"{where}: point {name!r} has devices={devices!r}; it must be an int >= 1.")
    overrides = {k: v for k, v in p.items() if k not in RESERVED}
    result.append(Point(name, devices, mode, p.get("config_arg", arg), overrides))
  return result


def command(point: Point, config_path: str, workdir: pathlib.Path, common: dict) -> list[str]:
  """The point's launch.py command line; the sweep's own command-line overrides come last, and
  win."""
  config = f"{config_path}:{point.config_arg}" if point.config_arg is not None else config_path
  overrides = {**point.overrides, **common}
  return [
    sys.executable,
    str(LAUNCH),
    f"--config={config}",
    f"--workdir={workdir}",
    f"--devices={point.devices}",
    f"--mode={point.mode}",
    "--nosweep",
    *[f"--config.{k}={v}" for k, v in overrides.items()],
  ]


def read_json(path: pathlib.Path, lines: bool = False):
  """A point's JSON file (or JSON-lines file), or an InputError saying how to redo the point."""
  try:
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines()] if lines else json.loads(text)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(
      f"{path} cannot be read ({type(e).__name__}: {e}). Delete the point's folder "
      f"{path.parent} to run it again."
    ) from None


def load_result(point: Point, folder: pathlib.Path) -> dict:
  result = read_json(folder / RESULT_FILE[point.mode])
  if point.mode == "train":
    result["metrics"] = read_json(folder / "metrics.jsonl", lines=True)
  return result


def is_finished(point: Point, folder: pathlib.Path, common: dict) -> bool:
  if not (folder / RESULT_FILE[point.mode]).exists():
    return False
  asked = read_json(folder / "point.json")
  if asked != json.loads(json.dumps(point.record(common))):
    raise InputError(
      f"{folder} holds a finished run of a different point ({asked}); the sweep now "
      "defines it differently. Use a new --workdir, or delete that folder to rerun it."
    )
  return True


def prepare(point: Point, folder: pathlib.Path, common: dict) -> None:
  """A fresh folder, except that an attempt which left checkpoints is resumed from them."""
  if folder.exists() and not any((folder / "checkpoints").glob("[0-9]*")):
    shutil.rmtree(folder)  # only what a failed or interrupted attempt wrote
  folder.mkdir(parents=True, exist_ok=True)
  (folder / RUN_MARKER).touch()  # the point's run goes into a folder of this project's
  (folder / "point.json").write_text(json.dumps(point.record(common), indent=2))


def last_error_line(log: str) -> str:
  lines = [line.strip() for line in log.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or ["no output"])[-1]


def regenerate_command(
  config_name: str, workdir: str, common: dict, default_devices: int, results: str
) -> list[str]:
  """The launch.py command line that reruns this sweep and rewrites `results`."""
  return [
    "python",
    "launch.py",
    f"--config={config_name}",
    f"--workdir={workdir}",
    *([f"--devices={default_devices}"] if default_devices != 1 else []),
    *[f"--config.{k}={v}" for k, v in common.items()],
    f"--results={results}",
  ]


def check_results_path(results: str) -> None:
  """Before any point runs: a results file must be Markdown in an existing folder."""
  path = pathlib.Path(results)
  if path.suffix != ".md" or not path.parent.is_dir() or path.is_dir():
    raise InputError(
      f"--results {results}: give a Markdown file in an existing folder, e.g. "
      "--results=docs/results/NAME.md."
    )


def run(
  module: ModuleType,
  config_name: str,
  workdir: str,
  common: dict,
  default_devices: int,
  results_file: str | None = None,
) -> dict:
  """Runs every point of the experiment `module` (loaded from `config_name`'s path) not yet
  finished, then writes WORKDIR/report.md and report.json, and the report to `results_file` too
  if given (report.write_results)."""
  config_path, arg = split_config_name(config_name)
  sweep = points(module, arg, default_devices)
  if results_file is not None:
    check_results_path(results_file)
  out = claim_folder(workdir)
  results = {}
  for i, point in enumerate(sweep, 1):
    tag = f"[{i}/{len(sweep)}] {point.name} ({point.mode}, {point.devices} devices)"
    results[point.name] = run_point(point, out / "points" / point.name, config_path, common, tag)
  lines = write_report(module, config_name, sweep, results, out)
  if results_file is not None:
    again = regenerate_command(config_name, workdir, common, default_devices, results_file)
    report_lib.write_results(results_file, again, lines, out)
    print(f"results -> {results_file}", flush=True)
  return results


def claim_folder(workdir: str, kind: str = "sweep") -> pathlib.Path:
  """The folder of a sweep (or a layout search, `kind`), refused if it is a file or holds what no
  sweep or search wrote; created and marked."""
  out = pathlib.Path(workdir).resolve()
  if out.exists() and not out.is_dir():
    raise InputError(f"--workdir {out} is a file; a {kind} needs a folder.")
  if out.is_dir() and not (out / RUN_MARKER).exists() and not (out / "points").is_dir():
    others = sorted(p.name for p in out.iterdir())
    if others:
      raise InputError(
        f"--workdir {out} holds files that no {kind} of this project wrote "
        f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); refusing to "
        "write into it. Choose a new or empty --workdir."
      )
  out.mkdir(parents=True, exist_ok=True)
  (out / RUN_MARKER).touch()
  return out


def run_point(point: Point, folder: pathlib.Path, config_path: str, common: dict, tag: str) -> dict:
  """The point's result: read back if finished earlier, else from its own launch.py process."""
  if is_finished(point, folder, common):
    print(f"{tag}: finished earlier, skipped", flush=True)
    return load_result(point, folder)
  t0 = time.perf_counter()
  result = launch_point(point, folder, config_path, common)
  seconds = time.perf_counter() - t0
  if "error" in result:
    print(
      f"{tag}: FAILED in {seconds:.0f} s: {result['error']} (log: {folder / 'log.txt'})", flush=True
    )
  else:
    print(f"{tag}: done in {seconds:.0f} s{report_lib.headline(result)}", flush=True)
  return result


def launch_point(
  point: Point, folder: pathlib.Path, config_path: str, common: dict, timeout: float | None = None
) -> dict:
  """Runs the point afresh in its own launch.py process (in this process's working directory, as
  if the user had typed its command), given `timeout` seconds: its result, or {"error": ...}."""
  prepare(point, folder, common)
  with open(folder / "log.txt", "w") as log:
    try:
      code = subprocess.run(
        command(point, config_path, folder, common),
        stdout=log,
        stderr=subprocess.STDOUT,
        timeout=timeout,
      ).returncode
    except subprocess.TimeoutExpired:
      code = "timeout"
  if code == 0:
    return load_result(point, folder)
  return {"error": f"exit {code}: {last_error_line((folder / 'log.txt').read_text())}"}


def write_report(
  module: ModuleType, config_name: str, sweep: list[Point], results: dict, out: pathlib.Path
) -> list[str]:
  """WORKDIR/report.md (the experiment's report(), or a generic table) and report.json."""
  records = [dataclasses.asdict(p) for p in sweep]
  if hasattr(module, "report"):
    body = module.report(records, results, out)
  else:
    body = report_lib.generic_table(results)
  failed = sum("error" in r for r in results.values())
  title = body.pop(0) if body and body[0].startswith("# ") else f"# Sweep `{config_name}`"
  lines = [
    title,
    "",
    f"`{config_name}`: {len(sweep)} points, {failed} failed. Point folders: "
    "`points/NAME/` (log.txt, point.json, the run's own files).",
    "",
    *body,
  ]
  (out / "report.md").write_text("\n".join(lines) + "\n")
  (out / "report.json").write_text(json.dumps({"points": records, "results": results}, indent=2))
  print(f"report -> {out / 'report.md'}", flush=True)
  return lines
