"""Is a planned layout compute- or communication-bound on a real accelerator?
(docs/formulas.md#roofline)

The hardware assumed (H100, TPU v5p, and the CS-2 that weight streaming is judged against) is here,
with sources.

Pure functions of a plan.json dict (train.plan) and a hardware spec. Two views:
- The closed-form conditions: data parallelism and FSDP are compute-bound when the tokens one
  batch shard processes per pass of the weights exceed C/W (peak FLOP/s over the bandwidth of the
  batch axes); tensor parallelism when Y < F W / C (F = d_ff, W the tensor axis' bandwidth).
- A direct comparison per step and device: compute time = the compiled matmul FLOPs / peak against
  communication time = collective bytes / bandwidth. The verdict times the compiled program's
  bytes, as its HLO moves them (plan["collective_bytes_by_dtype"]), at the byte-weighted bandwidth
  of the links the formula's terms use (plan.json counts bytes by collective kind, not axis).
  Beside it, the formula's terms for an accelerator's compile (comm.analytic_terms with the
  compute dtype on the wire, spmd.wire_dtype), each on its own axes' links: where the plan was
  compiled on a CPU, whose compiler moves 16-bit collectives as float32, that is what a GPU or TPU
  would move; activations and gathered weights halve in bf16, float32 gradients do not.
Both assume perfect overlap of compute and communication: the step takes at least the larger.
"""

import dataclasses
import difflib
import math

from cgpt_jax import config as config_lib
from cgpt_jax import presets
from cgpt_jax.costs import analysis, comm
from cgpt_jax.errors import InputError
from cgpt_jax.parallel.layouts import (
  AXES,  # outermost first: tensor neighbours are adjacent devices
)


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  peak_flops: float  # dense bf16 matmul FLOP/s per chip
  hbm_bytes: float  # accelerator memory per chip
  link_bytes_per_s: float  # per chip, one direction, a collective over one mesh axis on fast links
  node_size: int | None  # chips joined by those links; None = the whole mesh (TPU ICI torus)
  network_bytes_per_s: float  # per chip, one direction, between nodes
  source: str


# NVIDIA H100 SXM5 datasheet: BF16 Tensor Core 1,979 TFLOP/s with 2:4 sparsity, 989 dense; 80 GB
# HBM3; NVLink 4 900 GB/s per GPU (both directions), 450 GB/s each way to the NVSwitch, among the 8
# GPUs of a DGX/HGX H100 node. Between nodes one ConnectX-7 NIC per GPU, 400 Gb/s = 50 GB/s
# (DGX H100 user guide, network modules). C/W = 989e12 / 450e9 = 2,198.
H100 = Hardware(
  name="H100 SXM",
  peak_flops=989e12,
  hbm_bytes=80e9,
  link_bytes_per_s=450e9,
  node_size=8,
  network_bytes_per_s=50e9,
  source="NVIDIA H100 datasheet (989 TFLOP/s dense BF16, 80 GB HBM3, NVLink 900 GB/s "
  "bidirectional); DGX H100 user guide (8 GPUs per node, one 400 Gb/s ConnectX-7 per GPU)",
)
# Cloud TPU v5p docs: 459 TFLOP/s bf16 per chip, 95 GB HBM2e, 3D torus, ICI 1,200 GB/s per chip
# both directions over 6 links. "How to Scale Your Model" (part 2) rounds a link to 9e10 B/s each
# way; a ring along one torus axis uses both neighbours: 1.8e11 B/s, C/W = 2,550.
# Slices of up to 6,144 chips are one torus, so every mesh here is ICI only.
TPU_V5P = Hardware(
  name="TPU v5p",
  peak_flops=459e12,
  hbm_bytes=95e9,
  link_bytes_per_s=1.8e11,
  node_size=None,
  network_bytes_per_s=1.8e11,
  source="Cloud TPU v5p docs (459 TFLOP/s bf16, 95 GB HBM2e, ICI 1,200 GB/s per chip, 3D torus); "
  "How to Scale Your Model, part 2 (9e10 B/s per ICI link each way, 2 links per axis)",
)
HARDWARE = (H100, TPU_V5P)
BY_FLAG = {"h100": H100, "v5p": TPU_V5P}  # launch.py's --hardware names


def hardware(flag: str) -> Hardware:
  """The accelerator launch.py's --hardware names, or an InputError naming the nearest."""
  if flag.lower() in BY_FLAG:
    return BY_FLAG[flag.lower()]
  near = difflib.get_close_matches(flag.lower(), BY_FLAG, n=1, cutoff=0) or list(BY_FLAG)
  raise InputError(
    f"--hardware={flag}: unknown accelerator; the nearest is --hardware={near[0]} "
    f"(known: {', '.join(BY_FLAG)}; specs in cgpt_jax/costs/roofline.py)."
  )


@dataclasses.dataclass(frozen=True)
class StreamingSystem:
  """A machine that streams the weights in from off-chip storage every step (Cerebras' weight
  streaming, parallel/wafer.py): its compute against its system I/O."""

  name: str
  peak_flops: float  # dense 16-bit FLOP/s of the whole system
  io_bytes_per_s: float  # system I/O to the weight store, per direction
  source: str


# CS-2 system I/O: 12 x 100 GbE = 1.2 Tb/s (Cerebras CS-2 datasheet), in bytes per second. Dense
# 16-bit compute of one CS-2: Andromeda's 16 CS-2s give 120 PFLOP/s (Cerebras, SC22, reported by
# Tom's Hardware, 2022-11-14: "120 Petaflops of 16-bit half-precision").
CS2 = StreamingSystem(
  name="Cerebras CS-2",
  peak_flops=120e15 / 16,
  io_bytes_per_s=1.2e12 / 8,
  source="Cerebras CS-2 datasheet (12 x 100 GbE system I/O); Cerebras at SC22 via Tom's "
  "Hardware (Andromeda: 16 CS-2s, 120 PFLOP/s of 16-bit compute)",
)
# 16-bit weights in for the forward and again for the backward, 16-bit gradients out.
STREAM_BYTES_PER_PARAM = 6


def cs2_streaming_table(seq_len: int = 2048, system: StreamingSystem = CS2) -> list[dict]:
  """Per training step of each Cerebras-GPT size at the paper's batch on one CS-2: seconds to stream
  the weights in twice and the gradients out once at the system I/O rate, against seconds of
  compute at the wafer's dense peak (a lower bound on the real compute time)."""
  rows = []
  for name in presets.CEREBRAS_GPT:
    c = config_lib.resolve(config_lib.cerebras_gpt(name), presets.GPT2_VOCAB)
    m = c.model
    params = presets.closed_form_params(m.n_layers, m.d_model, m.vocab_size, m.n_positions)
    tokens = c.data.global_batch * seq_len
    stream_s = STREAM_BYTES_PER_PARAM * params / system.io_bytes_per_s
    compute_s = analysis.flops_per_token(m, seq_len) * tokens / system.peak_flops
    rows.append(
      {
        "model": name,
        "params": params,
        "batch": c.data.global_batch,
        "tokens_per_step": tokens,
        "stream_bytes_per_step": STREAM_BYTES_PER_PARAM * params,
        "stream_s": stream_s,
        "compute_s_at_peak": compute_s,
        "compute_over_stream": compute_s / stream_s,
        "bound": "compute" if compute_s >= stream_s else "streaming",
      }
    )
  return rows


def critical_tokens(hw: Hardware, bandwidth: float) -> float:
  """C / W: tokens a batch shard must process per pass of the weights to hide their traffic."""
  return hw.peak_flops / bandwidth


def axis_span(mesh: dict, axis: str) -> int:
  """Consecutive device ids one group of `axis` covers: its size times the sizes inside it (the
  mesh is row-major over AXES, so tensor neighbours are adjacent devices). An axis a plan does not
  name (one from before the axis existed) is 1."""
  inner = AXES[AXES.index(axis) :]
  return math.prod(mesh.get(a, 1) for a in inner)


def axes_bandwidth(hw: Hardware, mesh: dict, axes: tuple[str, ...]) -> float:
  """Per-chip bandwidth of a collective over `axes`: the fast links if every group stays inside one
  node, else the network (a ring that leaves the node is paced by each chip's NIC)."""
  spans = [axis_span(mesh, a) for a in axes if mesh.get(a, 1) > 1]
  inside = hw.node_size is None or all(s <= hw.node_size for s in spans)
  return hw.link_bytes_per_s if inside else hw.network_bytes_per_s


def measured_bytes(plan: dict) -> int:
  """Collective bytes one device sends per step, from the compiled HLO, all kinds together."""
  return sum(plan["collective_bytes_per_step"].values())


def compute_seconds(plan: dict, hw: Hardware) -> float:
  """Matmul FLOPs one device runs per step (remat recompute, pipeline bubbles included) / peak."""
  return plan["compiled_matmul_flops_per_step"] / plan["devices"] / hw.peak_flops


def terms_seconds(plan: dict, hw: Hardware, terms: dict[str, int]) -> float:
  """Seconds per step and device of analytic byte terms (comm.CAUSES), each at its axes' links."""
  return sum(v / axes_bandwidth(hw, plan["mesh"], comm.CAUSES[k][1]) for k, v in terms.items())


def comm_seconds(plan: dict, hw: Hardware, analytic_s: float) -> float:
  """Seconds per step and device of the compiled program's collectives, at the byte-weighted
  bandwidth of the analytic terms' axes, which take `analytic_s` (all on the fast links when
  nothing was expected)."""
  total = sum(plan["analytic_collective_terms"].values())
  measured = measured_bytes(plan)
  if not total:
    return measured / hw.link_bytes_per_s
  return measured * analytic_s / total


def weight_passes(plan: dict) -> int:
  """Times per step the batch shards' weights move: once per micro-step when they are sharded
  (FSDP, wafer: gathered for every slice), once per step when replicated (the gradient reduce)."""
  return plan["config"]["train"]["grad_accum"] if plan["mesh"]["fsdp"] > 1 else 1


def data_condition(plan: dict, hw: Hardware) -> dict | None:
  """DP/FSDP: tokens per batch shard per weight pass > C/W over the batch axes (None: no axes)."""
  mesh = plan["mesh"]
  shards = mesh["data"] * mesh["fsdp"]
  if shards == 1:
    return None
  tokens = plan["tokens_per_step"] / shards / weight_passes(plan)
  critical = critical_tokens(hw, axes_bandwidth(hw, mesh, ("data", "fsdp")))
  return {"tokens": tokens, "critical": critical, "compute_bound": tokens > critical}


def tensor_condition(plan: dict, hw: Hardware) -> dict | None:
  """Megatron TP: Y < F W / C over the tensor axis; None without tensor parallelism."""
  ways = plan["mesh"]["tensor"]
  if ways == 1:
    return None
  d_ff = plan["config"]["model"]["d_ff"]
  limit = d_ff * axes_bandwidth(hw, plan["mesh"], ("tensor",)) / hw.peak_flops
  return {"ways": ways, "limit": limit, "compute_bound": ways < limit}


def analyse(plan: dict, hw: Hardware) -> dict:
  """Everything the report shows for one plan on one accelerator."""
  compute = compute_seconds(plan, hw)
  comm_analytic = terms_seconds(plan, hw, plan["analytic_collective_terms"])
  comm = comm_seconds(plan, hw, comm_analytic)
  comm_accelerator = terms_seconds(plan, hw, plan["accelerator_collective_terms"])
  memory = plan["memory_per_device_bytes"]["total_bytes"]
  return {
    "hardware": hw.name,
    "memory_bytes": memory,
    "fits": memory <= hw.hbm_bytes,
    "compute_s": compute,
    "comm_s": comm,
    "comm_s_analytic": comm_analytic,
    "comm_s_accelerator_wire": comm_accelerator,
    "bound": "compute" if compute >= comm else "communication",
    "bound_accelerator_wire": "compute" if compute >= comm_accelerator else "communication",
    # Model FLOPs over peak for the step time max(compute, comm): what MFU could reach at best.
    "mfu_bound": plan["model_flops_per_step"]
    / plan["devices"]
    / hw.peak_flops
    / max(compute, comm),
    "data": data_condition(plan, hw),
    "tensor": tensor_condition(plan, hw),
  }
