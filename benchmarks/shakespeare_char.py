"""Wall time of the default experiment's full run, and what each CPU lever (docs/performance.md) is
worth, measured in one invocation on this machine. For a peer implementation timed beside ours
(same shapes, same process) see benchmarks/peers.py.

  python benchmarks/shakespeare_char.py --workdir runs/bench        # full 2000-step run + levers
  python benchmarks/shakespeare_char.py --workdir runs/bench --levers_only

Every run goes through launch.py in its own process (the allocator lever must be set at process
start).
Writes WORKDIR/report.md and WORKDIR/report.json.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import common
from absl import app, flags

from cgpt_jax.malloc import GLIBC_TUNABLES as TUNED_MALLOC

REPO = pathlib.Path(__file__).resolve().parents[1]

# A neutral tunable keeps launch.py from re-exec'ing with TUNED_MALLOC (it only sets it when unset).
DEFAULT_MALLOC = "glibc.malloc.check=0"

# name -> (config overrides, GLIBC_TUNABLES)
LEVERS = {
  "tuned (default)": ([], TUNED_MALLOC),
  "glibc malloc defaults": ([], DEFAULT_MALLOC),
  "no gradient barrier": (["--config.model.grad_barrier=False"], TUNED_MALLOC),
  "rolled layer scan": (["--config.model.scan_unroll=1"], TUNED_MALLOC),
}

_WORKDIR = flags.DEFINE_string("workdir", "runs/bench", "Where runs and the report go.")
_LEVER_STEPS = flags.DEFINE_integer("lever_steps", 300, "Steps per lever run.")
_LEVERS_ONLY = flags.DEFINE_bool("levers_only", False, "Skip the full 2000-step run.")


def launch(workdir: pathlib.Path, overrides: list[str], malloc: str) -> dict:
  env = {**os.environ, "GLIBC_TUNABLES": malloc}
  cmd = [
    sys.executable,
    str(REPO / "launch.py"),
    "--config",
    str(REPO / "experiments/shakespeare_char.py"),
    f"--workdir={workdir}",
    "--config.train.progress=False",
    "--config.checkpoint.every=0",
    *overrides,
  ]
  start = time.perf_counter()
  subprocess.run(cmd, cwd=REPO, env=env, check=True)
  summary = json.loads((workdir / "summary.json").read_text())
  summary["process_wall_s"] = time.perf_counter() - start
  return summary


def main(_):
  out = common.fresh_workdir(_WORKDIR.value)
  report = {}
  lines = ["# Default experiment: full run and CPU levers", ""]

  if not _LEVERS_ONLY.value:
    full = launch(out / "full", [], TUNED_MALLOC)
    report["full"] = full
    lines += [
      "| | steps | wall s (whole process) | ms/step | val loss |",
      "|---|---:|---:|---:|---:|",
      f"| cgpt-jax | {full['steps']} | {full['process_wall_s']:.0f} | {full['step_ms']:.1f} | "
      f"{full['final_eval_loss']:.4f} |",
      "",
      f"Compile {full['compile_s']:.1f} s, {full['tokens_per_s']:,.0f} tokens/s, "
      f"MFU {full['mfu']:.3f} of a measured {full['matmul_peak_flops'] / 1e9:.0f} GFLOP/s "
      "matmul peak.",
      "",
    ]

  steps = _LEVER_STEPS.value
  short = [
    f"--config.train.steps={steps}",
    f"--config.train.eval_every={steps}",
    "--config.data.eval_batches=1",
  ]
  levers = {
    name: launch(out / f"lever{i}", short + extra, malloc)
    for i, (name, (extra, malloc)) in enumerate(LEVERS.items())
  }
  report["levers"] = levers
  base = levers["tuned (default)"]["step_ms"]
  lines += [
    f"## CPU levers ({steps} steps each, ms/step over the run)",
    "",
    "| variant | ms/step | vs tuned |",
    "|---|---:|---:|",
  ]
  lines += [
    f"| {name} | {s['step_ms']:.1f} | {s['step_ms'] / base:.2f}x |" for name, s in levers.items()
  ]
  common.write_report(out, lines, report)


if __name__ == "__main__":
  app.run(main)
