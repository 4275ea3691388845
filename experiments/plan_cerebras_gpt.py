"""Planning at scale: every Cerebras-GPT size under candidate layouts on 64 to 512 virtual devices,
compiled ahead of time from abstract shapes (`--mode plan`), then judged against real accelerators.

  python launch.py --config experiments/plan_cerebras_gpt.py --workdir runs/plan_cerebras_gpt \
      --results docs/results/plan_cerebras_gpt.md

runs all of `get_sweep()` (cgpt_jax/sweep.py) and writes the report to WORKDIR/report.md and
docs/results/plan_cerebras_gpt.md (cgpt_jax/report.py's planning tables). One point alone:

  python launch.py --config experiments/plan_cerebras_gpt.py:13b --mode plan --devices 64 \
      --nosweep --workdir DIR --config.mesh.layout=fsdp --config.mesh.fsdp=8 --config.mesh.tensor=8

The training settings are a practitioner's, or 13B would need terabytes per device: bf16 compute,
full remat (each block keeps only its input for the backward), and gradient accumulation sized to
fit (cgpt_jax/costs/memory.py). The paper's batch is kept where the batch devices divide it;
otherwise the nearest multiple of the batch devices is used and the report says so. Each table
row: per-device memory from the compiled program, collective bytes per step measured in its HLO
beside the analytic value, and compute time against communication time on H100 and TPU v5p
(cgpt_jax/costs/roofline.py, hardware numbers and sources).
"""

import math
import pathlib

import ml_collections

from cgpt_jax import config as config_lib
from cgpt_jax import model as model_lib
from cgpt_jax import presets, report_plan
from cgpt_jax.costs import memory, roofline


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = config_lib.cerebras_gpt((arg or "111m").lower())
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  return c


def grad_accum(size: str, rows: int, tensor: int, split: int) -> int:
  """The fewest micro-steps for `rows` sequences per device whose activations fit beside the
  state split `split` ways (memory.grad_accum), for the size's config as a run resolves it (the
  GPT-2 vocabulary, padded as the model pads it)."""
  c = config_lib.resolve(get_config(size), presets.GPT2_VOCAB)
  m = c.model
  per_row = memory.activation_bytes_per_row(
    m.n_layers, m.d_model, c.data.seq_len, model_lib.padded_vocab(m), tensor
  )
  n_params = presets.closed_form_params(m.n_layers, m.d_model, m.vocab_size, m.n_positions)
  return memory.grad_accum(rows, per_row, memory.step_state_bytes(n_params, split))


def point(
  size: str,
  devices: int,
  layout: str,
  batch: int | None = None,
  microbatches: int | None = None,
  **axes: int,
) -> dict:
  """One plan: `axes` sizes the mesh (the rest are 1). Non-pipelined layouts get the gradient
  accumulation that fits; pipelines keep their microbatches in one step (grad_accum 1)."""
  sizes = {a: axes.get(a, 1) for a in roofline.AXES}
  assert math.prod(sizes.values()) == devices, (size, layout, sizes)
  paper = presets.CEREBRAS_GPT[size].batch
  batch = batch or paper
  split = sizes["fsdp"] * sizes["tensor"] * sizes["pipe"]
  k = (
    1
    if microbatches
    else grad_accum(size, batch // (sizes["data"] * sizes["fsdp"]), sizes["tensor"], split)
  )
  mesh = "x".join(str(sizes[a]) for a in roofline.AXES)
  p = {
    "name": f"{size}-{layout}-{mesh}",
    "devices": devices,
    "mode": "plan",
    "config_arg": size,
    "mesh.layout": layout,
    **{f"mesh.{a}": n for a, n in sizes.items()},
    "train.grad_accum": k,
  }
  if batch != paper:
    p["data.global_batch"] = batch
  if microbatches:
    p["pipeline.microbatches"] = microbatches
  return p


def get_sweep(arg=None) -> list[dict]:
  """Candidates per size. Batch devices must divide the batch: the paper's 120/264/528/1040/720
  have at most 8 or 16 as a power-of-two factor, so pure FSDP/DP over 64+ devices rounds the batch
  to a multiple of the devices (128, 256, 512, 1024, 768, 1024 at 512 devices), while tensor and
  pipeline axes keep the paper's. Tensor ways divide the heads (12, 17, 12, 16, 32, 32, 40)."""
  return [
    point("111m", 64, "dp", 128, data=64),
    point("111m", 64, "fsdp", 128, fsdp=64),
    point("111m", 64, "3d", microbatches=15, data=8, pipe=2, tensor=4),
    point("256m", 64, "dp", 256, data=64),  # 17 heads: no tensor parallelism
    point("256m", 64, "fsdp", 256, fsdp=64),
    point("590m", 64, "fsdp", 256, fsdp=64),
    point("590m", 64, "3d", microbatches=11, data=8, pipe=2, tensor=4),
    point("1.3b", 64, "fsdp", 512, fsdp=64),
    point("1.3b", 64, "fsdp", fsdp=16, tensor=4),
    point("1.3b", 64, "tp", data=16, tensor=4),
    point("2.7b", 64, "fsdp", 512, fsdp=64),
    point("2.7b", 64, "fsdp", fsdp=16, tensor=4),
    point("2.7b", 64, "3d", microbatches=33, data=4, pipe=4, tensor=4),
    point("6.7b", 64, "fsdp", 1024, fsdp=64),
    point("6.7b", 64, "fsdp", fsdp=16, tensor=4),
    point("6.7b", 64, "3d", microbatches=26, data=4, pipe=4, tensor=4),
    point("13b", 64, "fsdp", fsdp=8, tensor=8),
    point("13b", 64, "fsdp", fsdp=16, tensor=4),
    point("13b", 64, "tp", data=8, tensor=8),
    point("13b", 64, "3d", microbatches=90, data=4, pipe=2, tensor=8),
    point("13b", 64, "wafer", 768, fsdp=64),
    # 512 devices: each plan compiles for ~1.5 min here, so three.
    point("13b", 512, "fsdp", 1024, fsdp=512),
    point("13b", 512, "fsdp", 1024, fsdp=64, tensor=8),
    point("13b", 512, "3d", microbatches=45, data=16, pipe=4, tensor=8),
  ]


def report(sweep: list[dict], results: dict[str, dict], workdir: pathlib.Path) -> list[str]:
  del workdir
  return report_plan.plan_report(sweep, results)
