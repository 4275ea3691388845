"""The search's outputs: WORKDIR/search.json (one record per candidate), report.md (the top ten
and the recommendation) and pareto.png (memory per device against estimated step time)."""

import dataclasses
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from cgpt_jax.costs import roofline  # noqa: E402
from cgpt_jax.search import prune, rank  # noqa: E402

TOP = 10


@dataclasses.dataclass
class Inputs:
  config_name: str
  devices: int
  hw: roofline.Hardware
  budget: float
  candidates: list
  why: dict  # name -> why pruned
  estimates: dict  # name -> analytic memory (prune.memory_estimate)
  ranked: list  # (step seconds, candidate, rank.step_time) by the formulas
  plans: dict  # name -> compiled plan.json or {"error": ...}


def compiled_record(plan: dict, analytic_bytes: float, inp: Inputs) -> dict:
  """What a compiled plan says: memory beside the analytic estimate, bytes by kind, the times."""
  if "error" in plan:
    return {"compile_error": plan["error"]}
  memory = plan["memory_per_device_bytes"]["total_bytes"]
  return {
    "memory_compiled_bytes": memory,
    "memory_analytic_over_compiled": analytic_bytes / memory,
    "fits": memory <= inp.budget,
    "collective_bytes_by_kind": plan["collective_bytes_per_step"],
    "compile_s": plan["compile_s"],
    **rank.step_time(plan, inp.hw),
  }


def records(inp: Inputs) -> list[dict]:
  analytic = {c.name: t for _, c, t in inp.ranked}
  out = []
  for c in inp.candidates:
    r = c.record()
    if c.name in inp.estimates:
      r["memory_analytic_bytes"] = inp.estimates[c.name]["total"]
    if c.name in inp.why:
      r["pruned"] = inp.why[c.name]
    if c.name in analytic:
      r["analytic"] = analytic[c.name]
    if c.name in inp.plans:
      r.update(compiled_record(inp.plans[c.name], r["memory_analytic_bytes"], inp))
    out.append(r)
  return out


def _gb(n: float) -> str:
  return f"{n / 1e9:.3g}"


def _ms(s: float) -> str:
  return f"{s * 1e3:.4g}"


def table(rows: list[dict]) -> list[str]:
  lines = [
    "| # | candidate | GB/device compiled | analytic | ratio | compute ms | comm ms | "
    "bubble ms | step ms | MFU | bound |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for i, r in enumerate(rows, 1):
    lines.append(
      f"| {i} | `{r['name']}` | {_gb(r['memory_compiled_bytes'])} | "
      f"{_gb(r['memory_analytic_bytes'])} | {r['memory_analytic_over_compiled']:.2f} | "
      f"{_ms(r['compute_s'])} | {_ms(r['comm_s'])} | {_ms(r['bubble_s'])} | "
      f"{_ms(r['step_s'])} | {r['mfu']:.2f} | {r['bound']} |"
    )
  return lines


def reason(best: dict, runner_up: dict | None) -> str:
  """One sentence: why the recommendation."""
  why = (
    f"`{best['name']}` has the shortest estimated step ({_ms(best['step_s'])} ms, MFU "
    f"{best['mfu']:.2f}, {best['bound']}-bound) of the compiled candidates that fit, at "
    f"{_gb(best['memory_compiled_bytes'])} GB per device"
  )
  if runner_up:
    why += (
      f", {runner_up['step_s'] / best['step_s']:.2f}x faster than the next, `{runner_up['name']}`"
    )
  return why + "."


def plot(rows: list[dict], path: pathlib.Path, budget: float) -> None:
  """Memory per device against estimated step time of the compiled candidates; the front marked."""
  points = [(r["memory_compiled_bytes"] / 1e9, r["step_s"] * 1e3) for r in rows]
  front = rank.pareto(points)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (m, t), on in zip(points, front):
    ax.scatter(m, t, c="C3" if on else "C0", s=28)
  ax.axvline(budget / 1e9, color="grey", ls="--", label="memory budget")
  ax.set_xlabel("memory per device, compiled (GB)")
  ax.set_ylabel("estimated step time (ms)")
  ax.set_title("Layout search: compiled candidates (red: Pareto front)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown(inp: Inputs, fitting: list[dict], compiled: list[dict], counts: dict) -> list[str]:
  hw = inp.hw
  lines = [
    f"# Layout search: `{inp.config_name}` on {inp.devices} x {hw.name}",
    "",
    f"Budget {_gb(inp.budget)} GB per device. {counts['candidates']} candidates: "
    f"{counts['pruned']} pruned ({counts['pruned_divisibility']} divisibility, "
    f"{counts['pruned_memory']} memory with margin {prune.MEMORY_MARGIN}, "
    f"{counts['pruned_dominated']} dominated, {counts['pruned_invalid']} refused by setup), "
    f"{counts['ranked']} ranked by the formulas, {counts['compiled']} compiled "
    f"({counts['compile_errors']} failed), {len(fitting)} fit.",
    "",
    "Step time = max(compute, comm) + bubble: compute = compiled matmul FLOPs per device / "
    f"{hw.peak_flops / 1e12:.0f} TFLOP/s; comm = the compiled collective bytes at the links of "
    "their mesh axes (roofline.comm_seconds); bubble = a hand-written schedule's idle share "
    "(gpipe and circular compute their bubbles, already in the FLOPs). Memory: compiled "
    "(XLA:CPU, activations in float32) beside the analytic model (prune.memory_estimate).",
    "",
  ]
  if fitting:
    best = fitting[0]
    lines += ["## Recommendation", "", reason(best, fitting[1] if len(fitting) > 1 else None), ""]
  else:
    lines += ["## Recommendation", "", "None: no compiled candidate fits the budget.", ""]
  lines += ["## Top ten that fit", "", *table(fitting[:TOP]), "", "![pareto](pareto.png)", ""]
  over = [r for r in compiled if not r["fits"]]
  if over:
    lines += ["## Compiled, over the budget", "", *table(over[:TOP]), ""]
  errors = [r for r in inp.plans.items() if "error" in r[1]]
  if errors:
    lines += ["## Failed compiles", "", *[f"- `{n}`: {p['error']}" for n, p in errors], ""]
  return lines


def counts_of(inp: Inputs) -> dict:
  kinds = [w.split(":")[0].split(" ")[0] for w in inp.why.values()]
  errors = sum("error" in p for p in inp.plans.values())
  return {
    "candidates": len(inp.candidates),
    "pruned": len(inp.why),
    "pruned_divisibility": kinds.count("divisibility"),
    "pruned_memory": kinds.count("memory"),
    "pruned_dominated": kinds.count("dominated"),
    "pruned_invalid": kinds.count("invalid"),
    "ranked": len(inp.ranked),
    "compiled": len(inp.plans) - errors,
    "compile_errors": errors,
  }


def write(out: pathlib.Path, inp: Inputs) -> dict:
  """search.json, report.md and pareto.png in `out`; returns search.json's dict."""
  rs = records(inp)
  compiled = sorted((r for r in rs if "step_s" in r), key=lambda r: r["step_s"])
  fitting = [r for r in compiled if r["fits"]]
  counts = counts_of(inp)
  result = {
    "config": inp.config_name,
    "devices": inp.devices,
    "hardware": inp.hw.name,
    "budget_bytes": inp.budget,
    "memory_margin": prune.MEMORY_MARGIN,
    "counts": counts,
    "recommendation": fitting[0]["name"] if fitting else None,
    "least_compiled_gb": min((r["memory_compiled_bytes"] for r in compiled), default=0) / 1e9,
    "candidates": rs,
  }
  (out / "search.json").write_text(json.dumps(result))
  if compiled:
    plot(compiled, out / "pareto.png", inp.budget)
  (out / "report.md").write_text("\n".join(markdown(inp, fitting, compiled, counts)) + "\n")
  print(f"search: recommendation {result['recommendation']} -> {out}/report.md", flush=True)
  return result
