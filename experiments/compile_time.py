"""Compile time against depth: the 111M preset's train step compiled ahead of time (`--mode plan`,
one process per point) at 2, 10 (the preset) and 24 layers, single device, batch 8 x 2048.

  python launch.py --config experiments/compile_time.py --workdir runs/compile_time \
      --results docs/results/compile_time.md

The layers are one `lax.scan` over stacked weights (model.scan_blocks), so the compiled program
holds one layer's body whatever the depth: compile time should barely move with it. The report
gives each point's seconds and its ratio to the 2-layer compile, with the compiled FLOPs beside
their formula to show the deeper programs really do the deeper work.
"""

import ml_collections

from cgpt_jax import config as config_lib
from cgpt_jax import report as report_lib

DEPTHS = (2, 10, 24)


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = config_lib.cerebras_gpt("111m")
  c.data.global_batch = 8
  return c


def get_sweep(arg=None) -> list[dict]:
  del arg
  return [{"name": f"L{n}", "mode": "plan", "model.n_layers": n} for n in DEPTHS]


def report(sweep, results, workdir):
  del sweep, workdir
  return report_lib.compile_time_table(results, DEPTHS, "111M widths, batch 8 x 2048, one device")
