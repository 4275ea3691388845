"""Pipeline schedules against the number of microbatches, planned ahead of time (`--mode plan`):

  python launch.py --config experiments/pipeline_memory.py --workdir runs/pipeline_memory \
      --results docs/results/pipeline_memory.md

Each point compiles one train step from abstract shapes on 8 virtual devices, pipe 4 x data 2, at
the 111M widths (d_model 768, 12 heads, GPT-2 vocabulary) with 8 layers and T = 1024, float32, no
remat, one row per microbatch and device, so the batch grows with M. Per schedule and M:
per-device temporary memory from the compiled program, the bubble from the schedule's table beside
its formula, the most microbatches a stage holds, and the compiled FLOPs and ppermute bytes beside
their formulas. GPipe's and circular's backward keep every microbatch's activations; the 1F1B
family's keep what the schedule has in flight (cgpt_jax/parallel/pipeline_1f1b.py). Two more points
plan the 13B preset on 64 devices (pipe 4 x fsdp 4 x tensor 4, M = 8, bf16, full remat) under GPipe
and 1F1B.
"""

import ml_collections

from cgpt_jax import config as config_lib
from cgpt_jax import report as report_lib

MICROBATCHES = (4, 8, 16)
SCHEDULES = {"gpipe": 1, "circular": 2, "1f1b": 1, "interleaved_1f1b": 2, "zb_h1": 1}  # -> R


def get_config(arg=None) -> ml_collections.ConfigDict:
  size = (arg or "111m").lower()
  c = config_lib.cerebras_gpt(size)
  c.mesh.layout = "pp"
  if size == "13b":  # a practitioner's 13B settings (experiments/plan_cerebras_gpt.py)
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.global_batch = 64
    c.pipeline.microbatches = 8
    c.mesh.update(pipe=4, fsdp=4, tensor=4)
    return c
  c.model.n_layers = 8
  c.data.seq_len = 1024
  c.mesh.update(pipe=4, data=2)
  return c


def get_sweep(arg=None) -> list[dict]:
  del arg
  points = [
    {
      "name": f"{schedule}-M{m}",
      "devices": 8,
      "mode": "plan",
      "pipeline.schedule": schedule,
      "pipeline.repeats": repeats,
      "pipeline.microbatches": m,
      "data.global_batch": 2 * m,
      "data.eval_batch": 2 * m,
    }
    for schedule, repeats in SCHEDULES.items()
    for m in MICROBATCHES
  ]
  points += [
    {
      "name": f"13b-{schedule}",
      "devices": 64,
      "mode": "plan",
      "config_arg": "13b",
      "pipeline.schedule": schedule,
    }
    for schedule in ("gpipe", "1f1b")
  ]
  return points


def report(sweep, results, workdir):
  del sweep, workdir
  return report_lib.pipeline_memory_tables(
    results, SCHEDULES, MICROBATCHES, "S = 4, one row per microbatch and device"
  )
