"""Planning at scale: every Cerebras-GPT size under candidate layouts on 64 to 512 virtual devices,
compiled ahead of time from abstract shapes (`--mode plan`), then judged against real accelerators.

  python launch.py --config experiments/plan_cerebras_gpt.py:13b --mode plan --devices 64 \
      --workdir DIR --config.mesh.layout=fsdp --config.mesh.fsdp=8 --config.mesh.tensor=8

plans one point; the sweep runner runs all of `get_sweep()` and calls `report()`. The training
settings are a practitioner's, or 13B would need terabytes per device: bf16 compute, full remat
(each block keeps only its input for the backward), and gradient accumulation sized to fit (below).
The paper's batch is kept where the batch devices divide it; otherwise the nearest multiple of the
batch devices is used and the report says so. Each table row: per-device memory from the compiled
program, collective bytes per step measured in its HLO beside the analytic value, and compute time
against communication time on H100 and TPU v5p (cgpt_jax/costs/roofline.py, hardware numbers and sources).
"""

import math
import pathlib

import ml_collections

from cgpt_jax import config as config_lib
from cgpt_jax.costs import roofline

SEQ = 2048
VOCAB = 50304  # the GPT-2 vocabulary padded to a multiple of 128
# Activation memory a micro-step may take per device: half of an 80 GB accelerator, leaving the rest
# for the state, gathered weights and XLA's temporaries.
ACTIVATION_BUDGET = 40e9


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = config_lib.cerebras_gpt((arg or "111m").lower())
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  return c


def activation_bytes_per_row(size: str, tensor: int) -> float:
  """Bytes one sequence of a micro-step keeps alive on a device under full remat: every block's
  input [T, d] (float32 here: the CPU compiler computes bf16 in f32) and about three copies of the
  logits [T, V / Y] (logits, softmax, their gradient). Measured: within 1.2x of the compiled temp
  bytes for 13B."""
  p = config_lib.CEREBRAS_GPT[size]
  return SEQ * 4 * (p.n_layers * p.d_model + 3 * VOCAB / tensor)


def state_bytes(size: str, split: int) -> float:
  """float32 parameters, gradients and Adam moments, 16 bytes per parameter, split `split` ways
  (fsdp x tensor x pipe; data replicates them; REFERENCE.md §2)."""
  p = config_lib.CEREBRAS_GPT[size]
  return 16 * config_lib.closed_form_params(p.n_layers, p.d_model) / split


def grad_accum(size: str, rows: int, tensor: int, split: int) -> int:
  """The fewest micro-steps k (dividing the `rows` a device gets per step) whose micro-batch's
  activations fit what the budget leaves beside the state: fewer micro-steps, fewer gathers."""
  room = ACTIVATION_BUDGET - state_bytes(size, split)
  per_row = activation_bytes_per_row(size, tensor)
  for k in range(1, rows):
    if rows % k == 0 and rows // k * per_row <= room:
      return k
  return rows  # one sequence per micro-step: the least activation memory there is


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
  paper = config_lib.CEREBRAS_GPT[size].batch
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


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
  return f"{n / 1e9:,.1f}"


def _ms(s: float) -> str:
  return f"{s * 1e3:,.0f}"


def plan_row(p: dict, plan: dict) -> dict:
  """The numbers of one report row, from the point and its plan.json."""
  m = plan["mesh"]
  return {
    "name": p["name"],
    "size": p["config_arg"],
    "layout": plan["layout"],
    "mesh": "×".join(str(m[a]) for a in roofline.AXES),
    "devices": plan["devices"],
    "batch": plan["tokens_per_step"] // SEQ,
    "paper_batch": config_lib.CEREBRAS_GPT[p["config_arg"]].batch,
    "grad_accum": plan["config"]["train"]["grad_accum"],
    "microbatches": plan.get("pipeline", {}).get("microbatches"),
    "memory_bytes": plan["memory_per_device_bytes"]["total_bytes"],
    "fits_80GB": plan["fits_80GB"],
    "bytes_measured": roofline.measured_bytes(plan),
    "bytes_analytic": plan["analytic_collective_bytes_per_step"],
    "hardware": {hw.name: roofline.analyse(plan, hw) for hw in roofline.HARDWARE},
  }


def _verdict(r: dict) -> str:
  tokens = f"{r['data']['tokens']:,.0f}/{r['data']['critical']:,.0f}" if r["data"] else "—"
  ways = f"{r['tensor']['ways']}/{r['tensor']['limit']:.1f}" if r["tensor"] else "—"
  ok = [c["compute_bound"] for c in (r["data"], r["tensor"]) if c]
  conditions = "compute" if all(ok) else "comm"
  return (
    f"{_ms(r['compute_s'])} | {_ms(r['comm_s'])} | **{r['bound']}** | "
    f"{_ms(r['comm_s_accelerator_wire'])} | {r['bound_accelerator_wire']} | {tokens} | "
    f"{ways} | {conditions if ok else '—'}"
  )


def report_rows(rows: list[dict]) -> list[str]:
  lines = [
    "| point | layout | data×pipe×fsdp×tensor | batch (paper) | k | M | GB/device | fits 80 GB | "
    "GB/step/device measured | analytic | ratio |",
    "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
  ]
  for r in rows:
    batch = f"{r['batch']}" + ("" if r["batch"] == r["paper_batch"] else f" ({r['paper_batch']})")
    ratio = r["bytes_measured"] / r["bytes_analytic"] if r["bytes_analytic"] else float("nan")
    lines.append(
      f"| {r['name']} | {r['layout']} | {r['mesh']} | {batch} | {r['grad_accum']} | "
      f"{r['microbatches'] or '—'} | {_gb(r['memory_bytes'])} | "
      f"{'yes' if r['fits_80GB'] else '**no**'} | {_gb(r['bytes_measured'])} | "
      f"{_gb(r['bytes_analytic'])} | {ratio:.2f} |"
    )
  for hw in roofline.HARDWARE:
    lines += [
      "",
      f"**{hw.name}** — compute = compiled matmul FLOPs per device / "
      f"{hw.peak_flops / 1e12:.0f} TFLOP/s; comm = the compiled program's bytes per device at "
      "the links their axes use (the verdict); beside it the formula's bytes with the bf16 "
      "compute dtype on the wire, as a GPU or TPU compile moves activations and gathered "
      "weights (gradients stay float32); §2 conditions: tokens per batch shard per weight pass "
      "vs C/W, tensor ways Y vs F·W/C.",
      "",
      "| point | compute ms | comm ms compiled | bound | comm ms bf16 wire | bound at bf16 wire | "
      "tokens / C/W | Y / F·W/C | §2 conditions |",
      "|---|---:|---:|---|---:|---|---:|---:|---|",
    ]
    lines += [f"| {r['name']} | {_verdict(r['hardware'][hw.name])} |" for r in rows]
  return lines


def hardware_lines() -> list[str]:
  lines = [
    "| accelerator | bf16 peak | HBM | fast links (per chip, one way) | between nodes | "
    "C/W | source |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for hw in roofline.HARDWARE:
    node = f"{hw.node_size} chips" if hw.node_size else "whole torus"
    lines.append(
      f"| {hw.name} | {hw.peak_flops / 1e12:.0f} TFLOP/s | "
      f"{hw.hbm_bytes / 1e9:.0f} GB | {hw.link_bytes_per_s / 1e9:.0f} GB/s ({node}) | "
      f"{hw.network_bytes_per_s / 1e9:.0f} GB/s | "
      f"{roofline.critical_tokens(hw, hw.link_bytes_per_s):,.0f} | {hw.source} |"
    )
  return lines


def summary_lines(rows: list[dict], size: str = "13b") -> list[str]:
  """One line per plan of `size`: the answer to "what would it need on N devices laid out so"."""
  out = []
  for r in rows:
    if r["size"] != size:
      continue
    hw = r["hardware"]
    out.append(
      f"- {r['layout']} {r['mesh']} on {r['devices']}: {_gb(r['memory_bytes'])} GB/device "
      f"({'fits' if r['fits_80GB'] else 'does not fit'} 80 GB), "
      f"{_gb(r['bytes_measured'])} GB/step per device measured vs {_gb(r['bytes_analytic'])} analytic; "
      + ", ".join(
        f"{name}: {a['bound']}-bound ({_ms(a['compute_s'])} ms compute, "
        f"{_ms(a['comm_s'])} ms comm as compiled, {_ms(a['comm_s_accelerator_wire'])} "
        "ms with bf16 on the wire)"
        for name, a in hw.items()
      )
    )
  return out


def report(sweep: list[dict], results: dict[str, dict], workdir: pathlib.Path) -> list[str]:
  rows = [plan_row(p, results[p["name"]]) for p in sweep if "error" not in results[p["name"]]]
  failed = [
    f"- {p['name']}: {results[p['name']]['error']}" for p in sweep if "error" in results[p["name"]]
  ]
  lines = [
    "# Planning Cerebras-GPT at scale",
    "",
    "## Hardware assumed",
    "",
    *hardware_lines(),
    "",
    "## 13B",
    "",
    *summary_lines(rows),
    "",
    "## Every plan",
    "",
    "bf16 compute, full remat; k = gradient-accumulation micro-steps, M = pipeline "
    "microbatches; bytes are what one device sends per optimizer step, measured in the "
    "compiled HLO beside comm.py's formula for the same backend. The CPU compiler moves "
    "every collective as float32 (plan.json's collective_bytes_by_dtype), the bf16 "
    "activations and gathered weights included.",
    "",
    *report_rows(rows),
  ]
  if failed:
    lines += ["", "## Failed", "", *failed]
  return lines
