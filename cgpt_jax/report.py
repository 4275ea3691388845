"""Tables and plots for sweeps, each experiment's report built from its points' results: the layout
ablation (every layout against `single`), pipeline memory against microbatches, compile time
against depth, and a generic table for sweeps that define no report of their own. Planning at scale
and the scaling study have their own modules (report_plan.py, report_scaling.py). Input: each
point's summary.json as a dict (with its metrics.jsonl records under "metrics") or its plan.json,
or {"error": message} for a point that failed.

`write_results` puts a report where the docs link it (docs/results/NAME.md), headed by the command
that regenerates it: `launch.py --results` for sweeps (cgpt_jax/sweep.py), and the benchmarks'
own `--results`.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil

import numpy as np

from cgpt_jax.parallel.layouts import AXES

# The layouts issue's tolerance: same seed, same data, every logged loss equal to single's to this
# relative difference in float32 (tests/test_layouts.py).
LOSS_RTOL = 1e-5


def headline(result: dict) -> str:
  """A few words for a sweep's progress line."""
  if "final_loss" in result:
    return (
      f": loss {result['final_loss']:.4f}, val {result['final_eval_loss']:.4f}, "
      f"{result['tokens_per_s']:,.0f} tokens/s"
    )
  if "memory_per_device_bytes" in result:
    return f": {result['memory_per_device_bytes']['total_bytes'] / 2**30:.2f} GiB per device"
  return ""


def generic_table(results: dict) -> list[str]:
  lines = ["| point | result |", "|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {'error: ' + r['error'] if 'error' in r else headline(r)[2:]} |")
  return lines


def losses(result: dict) -> np.ndarray:
  """[steps, 2]: (step, loss) of every logged training step."""
  return np.array([(m["step"], m["loss"]) for m in result["metrics"]])


def max_loss_rdiff(result: dict, reference: dict) -> float:
  """Largest relative difference from the reference's loss over the steps both logged."""
  ours, ref = dict(map(tuple, losses(result))), dict(map(tuple, losses(reference)))
  common = sorted(set(ours) & set(ref))
  if not common:
    return float("nan")
  return max(abs(ours[s] - ref[s]) / abs(ref[s]) for s in common)


def bubble(s: dict) -> float:
  return s["pipeline"]["bubble_fraction_theory"] if "pipeline" in s else 0.0


def mesh_text(s: dict) -> str:
  m = s["mesh"]
  return " x ".join(str(m.get(a, 1)) for a in AXES)  # summaries from before an axis existed: 1


def layouts_table(results: dict, reference: str = "single") -> list[str]:
  """Per layout: mesh, speed and memory against the reference, collective bytes measured in the
  compiled HLO against comm.py's formula, the pipeline bubble, and the loss against the
  reference's at every logged step."""
  ref = results[reference]
  lines = [
    f"| layout | mesh ({' x '.join(AXES)}) | tokens/s | vs single | memory/device GiB "
    "| vs single | collective MB/step measured | analytic | measured/analytic | bubble "
    f"| final loss | - single | max rel. diff, all steps | within {LOSS_RTOL:g} |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for name, s in results.items():
    if "error" in s:
      lines.append(f"| {name} | error: {s['error']} |" + " |" * 12)
      continue
    measured = sum(s["collective_bytes_per_step"].values())
    analytic = s["analytic_collective_bytes_per_step"]
    memory = s["memory_per_device_bytes"]["total_bytes"]
    rdiff = max_loss_rdiff(s, ref)
    lines.append(
      f"| {name} | {mesh_text(s)} | {s['tokens_per_s']:,.0f} | "
      f"{s['tokens_per_s'] / ref['tokens_per_s']:.2f} | {memory / 2**30:.2f} | "
      f"{memory / ref['memory_per_device_bytes']['total_bytes']:.2f} | {measured / 1e6:.1f} | "
      f"{analytic / 1e6:.1f} | {measured / analytic if analytic else float('nan'):.3f} | "
      f"{bubble(s):.3f} | {s['final_loss']:.6f} | {s['final_loss'] - ref['final_loss']:+.1e} | "
      f"{rdiff:.1e} | {'yes' if rdiff <= LOSS_RTOL else '**no**'} |"
    )
  return lines


def pipeline_table(results: dict, reference: str = "single") -> list[str]:
  """Bubble theory beside what was measured: the schedule's closed form beside its table
  (timeline.py), the most microbatches a stage holds, step time and temporary memory against
  single (virtual devices share the cores, so bubble work costs time like any other work; the
  1F1B family's idle rounds compute nothing), compiled FLOPs against single's, and the ppermute
  bytes against the formula's one activation per hop and round."""
  ref = results[reference]
  lines = [
    "| pipeline | schedule | S | M | R | bubble formula | table | peak in flight "
    "| layer FLOPs ratio | step FLOPs ratio theory | measured | step time vs single "
    "| temp memory vs single | ppermute MB measured | analytic |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, s in results.items():
    if "pipeline" not in s:
      continue
    p = s["pipeline"]
    temp = s["memory_per_device_bytes"]["temp_bytes"] / ref["memory_per_device_bytes"]["temp_bytes"]
    lines.append(
      f"| {name} | {p['schedule']} | {p['stages']} | {p['microbatches']} | {p['repeats']} | "
      f"{p['bubble_fraction_theory']:.3f} | {p['bubble_fraction_table']:.3f} | "
      f"{max(p['peak_in_flight_per_stage'])} | {p['layer_flops_ratio_theory']:.3f} | "
      f"{p['step_flops_ratio_theory']:.3f} | {p['step_flops_ratio_measured']:.3f} | "
      f"{s['step_ms'] / ref['step_ms']:.2f} | {temp:.2f} | "
      f"{s['collective_bytes_per_step'].get('collective-permute', 0) / 1e6:.1f} | "
      f"{s['analytic_collective_terms']['pipeline_hops'] / 1e6:.1f} |"
    )
  return lines


def wafer_table(results: dict, reference: str = "single") -> list[str]:
  """Weight streaming: bytes streamed inside the layer scan against 3 P_layers b (n-1)/n, and the
  working set (temp: activations plus the layer streamed in) beside the sharded store
  (arguments)."""
  ref = results[reference]["memory_per_device_bytes"]
  lines = [
    "| layout | streamed MB/step measured | analytic | measured/analytic | working set MiB "
    "| vs single | store MiB/device | vs single |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, s in results.items():
    if "wafer" not in s:
      continue
    w, memory = s["wafer"], s["memory_per_device_bytes"]
    lines.append(
      f"| {name} | {w['streamed_bytes_per_step'] / 1e6:.1f} | "
      f"{w['analytic_streamed_bytes_per_step'] / 1e6:.1f} | "
      f"{w['streamed_bytes_per_step'] / w['analytic_streamed_bytes_per_step']:.3f} | "
      f"{memory['temp_bytes'] / 2**20:.0f} | {memory['temp_bytes'] / ref['temp_bytes']:.2f} | "
      f"{memory['argument_bytes'] / 2**20:.0f} | "
      f"{memory['argument_bytes'] / ref['argument_bytes']:.2f} |"
    )
  return lines


def layouts_plot(results: dict, path: pathlib.Path, reference: str = "single") -> None:
  """Four panels, one bar or curve per layout that ran: tokens/s against single, memory per device,
  collective bytes measured beside analytic, and |loss - single's| per step (log scale)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = {n: s for n, s in results.items() if "error" not in s}
  ref = ok[reference]
  names = list(ok)
  y = np.arange(len(names))
  fig, ax = plt.subplots(2, 2, figsize=(15, 2.2 + 0.42 * len(names)))
  ax[0, 0].barh(y, [s["tokens_per_s"] / ref["tokens_per_s"] for s in ok.values()])
  ax[0, 0].axvline(1.0, color="k", lw=0.8)
  ax[0, 0].set_xlabel("tokens/s vs single")
  ax[0, 1].barh(y, [s["memory_per_device_bytes"]["total_bytes"] / 2**30 for s in ok.values()])
  ax[0, 1].set_xlabel("memory per device (GiB, compiled)")
  ax[1, 0].barh(
    y - 0.2,
    [sum(s["collective_bytes_per_step"].values()) / 1e6 for s in ok.values()],
    height=0.4,
    label="measured (HLO)",
  )
  ax[1, 0].barh(
    y + 0.2,
    [s["analytic_collective_bytes_per_step"] / 1e6 for s in ok.values()],
    height=0.4,
    label="analytic (comm.py)",
  )
  ax[1, 0].set_xlabel("collective MB per device per step")
  ax[1, 0].legend(loc="lower right")
  for a in (ax[0, 0], ax[0, 1], ax[1, 0]):
    a.set_yticks(y, names)
    a.invert_yaxis()
  ref_losses = dict(map(tuple, losses(ref)))
  for name, s in ok.items():
    if name == reference:
      continue
    steps, diff = zip(
      *[(t, abs(v - ref_losses[t]) / ref_losses[t]) for t, v in losses(s) if t in ref_losses]
    )
    ax[1, 1].semilogy(steps, np.maximum(diff, 1e-9), marker=".", label=name)
  ax[1, 1].axhline(LOSS_RTOL, color="k", ls="--", lw=0.8, label=f"tolerance {LOSS_RTOL:g}")
  ax[1, 1].set_xlabel("step")
  ax[1, 1].set_ylabel("|loss - single| / single (1e-9 = equal)")
  ax[1, 1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Results files (docs/results/NAME.md)
# ----------------------------------------------------------------------------------------------
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)/\s]+\.png)\)")


def results_header(command: list[str]) -> str:
  """The first line of a results file: the command that regenerates it."""
  return f"Regenerate with `{shlex.join(command)}` (it rewrites this file)."


def write_results(
  path: str | pathlib.Path, command: list[str], lines: list[str], workdir: pathlib.Path
) -> pathlib.Path:
  """Writes a report (`lines`, whose images are files in `workdir`) to the results file `path`,
  headed by `command`. Each image the report links is copied beside the file and the link follows
  it: NAME.png for the results file NAME.md (an image already named NAME*.png keeps its name,
  another gets NAME_ before it), so one folder holds every experiment's results."""
  path = pathlib.Path(path)
  stem = path.stem

  def copy(m: re.Match) -> str:
    name = m.group(2)
    if not (workdir / name).is_file():
      return m.group(0)
    target = name if name.startswith(stem) else f"{stem}_{name}"
    shutil.copyfile(workdir / name, path.parent / target)
    return f"![{m.group(1)}]({target})"

  body = [_IMAGE.sub(copy, line) for line in lines]
  path.write_text("\n".join([results_header(command), "", *body]) + "\n")
  return path


# ----------------------------------------------------------------------------------------------
# Pipeline memory against microbatches (experiments/pipeline_memory.py)
# ----------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def pipeline_memory_tables(
  results: dict, schedules: dict[str, int], microbatches: tuple[int, ...], setting: str
) -> list[str]:
  """Planned pipelines (`setting` says which): per schedule (with its repeats R) the temporary
  memory per device at each microbatch count M (points named SCHEDULE-M<M>) and its growth from the
  first M to the last; then
  per point the bubble (formula and table), lockstep rounds, the most microbatches a stage holds,
  FLOPs against the unpipelined step and the formula, ppermute and all collective bytes against
  the formula, and memory per device."""
  lines = [
    f"## Temporary memory per device against M ({setting})",
    "",
    "| schedule | R | "
    + " | ".join(f"M = {m} GiB" for m in microbatches)
    + f" | M = {microbatches[-1]} / M = {microbatches[0]} |",
    "|---|---:|" + "---:|" * (len(microbatches) + 1),
  ]
  for schedule, repeats in schedules.items():
    plans = [results.get(f"{schedule}-M{m}", {"error": "not run"}) for m in microbatches]
    if any("error" in p for p in plans):
      lines.append(
        f"| {schedule} | {repeats} | error: {next(p['error'] for p in plans if 'error' in p)} |"
      )
      continue
    temp = [p["memory_per_device_bytes"]["temp_bytes"] for p in plans]
    lines.append(
      f"| {schedule} | {repeats} | "
      + " | ".join(map(_gib, temp))
      + f" | {temp[-1] / temp[0]:.2f} |"
    )
  lines += [
    "",
    "## Bubble, in-flight microbatches, FLOPs and ppermute bytes",
    "",
    "| point | bubble formula | table | lockstep rounds | peak in flight "
    "| FLOPs / unpipelined | compiled / formula | ppermute MB | formula | all bytes / formula "
    "| memory GiB/device | fits 80 GB |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for name, p in results.items():
    if "error" in p:
      lines.append(f"| {name} | error: {p['error']} |" + " |" * 10)
      continue
    q = p["pipeline"]
    rounds = q.get("executed", {}).get("rounds", q["iterations"])
    measured = sum(p["collective_bytes_per_step"].values())
    lines.append(
      f"| {name} | {q['bubble_fraction_theory']:.3f} | {q['bubble_fraction_table']:.3f} | "
      f"{rounds} | {max(q['peak_in_flight_per_stage'])} | {q['step_flops_ratio_measured']:.3f} | "
      f"{p['compiled_matmul_flops_per_step'] / p['expected_matmul_flops_per_step']:.4f} | "
      f"{p['collective_bytes_per_step'].get('collective-permute', 0) / 1e6:.1f} | "
      f"{p['analytic_collective_terms']['pipeline_hops'] / 1e6:.1f} | "
      f"{measured / p['analytic_collective_bytes_per_step']:.4f} | "
      f"{_gib(p['memory_per_device_bytes']['total_bytes'])} | {p['fits_80GB']} |"
    )
  return lines


# ----------------------------------------------------------------------------------------------
# Long context (experiments/long_context.py)
# ----------------------------------------------------------------------------------------------
def long_context_table(results: dict, seq_len: int, reference: str = "single") -> list[str]:
  """Planned rings against `reference` at `seq_len` tokens: per-device memory (total and
  temporary) and its ratio to the reference's, the ring's collective-permute bytes beside the
  formula (comm.py's context terms), every collective's bytes beside the formula, and the compiled
  matmul FLOPs per token beside the reference's with the ring's score fraction."""
  ref = results.get(reference, {"error": "not run"})

  def per_token_flops(p):
    return p["compiled_matmul_flops_per_step"] / p["tokens_per_step"]

  def vs_ref(value, of):
    return "" if "error" in ref else f"{value / of(ref):.3f}"

  lines = [
    f"## T = {seq_len:,}: memory per device and bytes per step",
    "",
    "| point | mesh | memory GiB/device | / single | temp GiB | ring ppermute MB | formula "
    "| all collectives MB | / formula | FLOPs per token / single | score fraction |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, p in results.items():
    if "error" in p:
      lines.append(f"| {name} | error: {p['error']} |" + " |" * 9)
      continue
    total = p["memory_per_device_bytes"]["total_bytes"]
    terms = p["analytic_collective_terms"]
    ring = terms.get("context_kv_ring", 0) + terms.get("context_kv_grad_ring", 0)
    ppermute = p["collective_bytes_per_step"].get("collective-permute", 0)
    measured = sum(p["collective_bytes_per_step"].values())
    analytic = p["analytic_collective_bytes_per_step"]
    lines.append(
      f"| {name} | {mesh_text(p)} | {_gib(total)} | "
      f"{vs_ref(total, lambda r: r['memory_per_device_bytes']['total_bytes'])} | "
      f"{_gib(p['memory_per_device_bytes']['temp_bytes'])} | {ppermute / 1e6:.1f} | "
      f"{ring / 1e6:.1f} | {measured / 1e6:.1f} | {measured / analytic if analytic else 1:.4f} | "
      f"{vs_ref(per_token_flops(p), per_token_flops)} | "
      f"{p.get('context', {}).get('score_fraction', 1.0):.4f} |"
    )
  return lines


# ----------------------------------------------------------------------------------------------
# Compile time against depth (experiments/compile_time.py)
# ----------------------------------------------------------------------------------------------
def compile_time_table(results: dict, depths: tuple[int, ...], setting: str) -> list[str]:
  """Per depth (points named L<layers>) of the model `setting` describes: compile seconds, their
  ratio to the first depth's, and the compiled matmul FLOPs over the formula's (1: the deeper
  program does the deeper work)."""
  first = depths[0]
  base = results.get(f"L{first}", {}).get("compile_s")
  lines = [
    f"## Compile time against depth ({setting})",
    "",
    f"| layers | compile s | / {first} layers | compiled FLOPs / formula |",
    "|---:|---:|---:|---:|",
  ]
  for n in depths:
    p = results.get(f"L{n}", {"error": "not run"})
    if "error" in p:
      lines.append(f"| {n} | error: {p['error']} | | |")
      continue
    flops = p["compiled_matmul_flops_per_step"] / p["expected_matmul_flops_per_step"]
    lines.append(f"| {n} | {p['compile_s']:.2f} | {p['compile_s'] / base:.2f} | {flops:.4f} |")
  return lines
