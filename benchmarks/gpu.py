"""The 111M Cerebras-GPT preset in bfloat16 on the accelerator at hand: tokens/s, MFU against the
chip's dense bf16 peak, and memory, on one device and under a layout over every device present.

  python benchmarks/gpu.py --workdir runs/gpu                   # 16 x 2048 tokens per device
  python benchmarks/gpu.py --workdir runs/gpu --layout=dp --batch=8
  python benchmarks/gpu.py --workdir runs/gpu_tiny --tiny       # 2 layers, d 128: seconds on a CPU

The layout run keeps the per-device batch (--batch sequences on each device), so its tokens/s over
n times the single device's is its scaling efficiency. MFU is model FLOPs/s
(analysis.flops_per_token) over the devices' summed peak: the datasheet's dense bf16 figure for the
device kinds in PEAKS, else (a CPU, an unlisted card) the bfloat16 matmul peak measured in this
process in bf16, and the report says which (virtual CPU devices share one host's peak). Memory: the
compiled step's memory_analysis per device and, where the device reports it, its allocator's peak
bytes in use. Writes WORKDIR/report.md and WORKDIR/report.json.
"""

import sys
import time

import common
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from cgpt_jax import config as config_lib
from cgpt_jax import presets
from cgpt_jax.costs import analysis, roofline
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import layouts
from cgpt_jax.train import setup, step_functions

# Dense bf16 matmul FLOP/s per chip, by the name the device reports (jax's device_kind).
# NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOP/s (624 with sparsity), SXM4 and PCIe alike.
A100 = 312e12
PEAKS = {
  # H100 SXM5, which names itself "H100 80GB HBM3": its datasheet's 989 TFLOP/s (roofline.H100).
  "NVIDIA H100 80GB HBM3": roofline.H100.peak_flops,
  # NVIDIA H200 datasheet (SXM): BF16 Tensor Core 1,979 TFLOP/s with sparsity, 989 dense, the
  # H100's.
  "NVIDIA H200": roofline.H100.peak_flops,
  "NVIDIA A100-SXM4-40GB": A100,
  "NVIDIA A100-SXM4-80GB": A100,
  "NVIDIA A100-PCIE-40GB": A100,
  "NVIDIA A100 80GB PCIe": A100,
  # Cloud TPU v5p docs: 459 TFLOP/s bf16 (roofline.TPU_V5P); a v5p names itself "TPU v5".
  "TPU v5": roofline.TPU_V5P.peak_flops,
}
TINY = {"n_layers": 2, "d_model": 128, "n_heads": 4}
# --tiny's vocabulary, the bytes tokenizer's: GPT-2's would be 94% of a tiny step's FLOPs.
TINY_VOCAB = 256

_WORKDIR = flags.DEFINE_string("workdir", "runs/gpu", "Where the report goes.")
_TINY = flags.DEFINE_bool(
  "tiny",
  False,
  f"A tiny model ({TINY}, vocabulary {TINY_VOCAB}) and batch 2 x 64: seconds on a CPU.",
)
_BATCH = flags.DEFINE_integer(
  "batch", None, "Sequences per device (default 16, --tiny 2).", lower_bound=1
)
_SEQ_LEN = flags.DEFINE_integer(
  "seq_len", None, "Tokens per sequence (default 2048, --tiny 64).", lower_bound=1
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per run first.", lower_bound=1)
_LAYOUT = flags.DEFINE_enum(
  "layout",
  "fsdp",
  [name for name in layouts.LAYOUT_PRESETS if name != "single"],
  "Layout over every device, beside the single-device run.",
)


def chip_peak(kind: str) -> tuple[float, str]:
  """(peak FLOP/s of one device, where it comes from)."""
  if kind in PEAKS:
    return PEAKS[kind], f"datasheet dense bf16 peak of {kind}"
  return (
    analysis.measure_matmul_peak(dtype=jnp.bfloat16),
    f"bfloat16 matmul peak measured in this process ({kind!r} has no datasheet peak in PEAKS)",
  )


def make_config(layout: str, batch: int) -> ml_collections.ConfigDict:
  c = config_lib.cerebras_gpt("111m")
  c.model.dtype = "bfloat16"
  if _TINY.value:
    c.model.update(TINY)  # the preset only fills the fields left unset (config.resolve_model)
  c.data.global_batch = batch
  c.data.seq_len = _SEQ_LEN.value or (64 if _TINY.value else 2048)
  c.mesh.layout = layout
  return c


def peak_in_use(devices) -> int | None:
  """The largest allocator peak of `devices`, or None where they do not report one (a CPU)."""
  peaks = [
    stats["peak_bytes_in_use"]
    for d in devices
    if (stats := d.memory_stats()) and "peak_bytes_in_use" in stats
  ]
  return max(peaks) if peaks else None


def shares_host() -> bool:
  """Virtual CPU devices share the host's cores: chip_peak measured all of theirs together."""
  return jax.devices()[0].platform == "cpu"


def measure(cfg: ml_collections.ConfigDict, vocab: int, watched, peak: float) -> dict:
  """Compiles and times the train step of `cfg` on random tokens; `watched` are the devices whose
  allocator peak is this run's. MFU is over `peak` per device, or once where they share a host."""
  s = setup.build(cfg, vocab)
  d, devices = s.cfg.data, s.layout.mesh.size
  state = setup.make_init(s)()
  shape = (d.global_batch, d.seq_len + 1)
  start = time.perf_counter()
  step = (
    step_functions.make_train_step(s)
    .lower(state, jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s.batch_sharding))
    .compile()
  )
  compile_s = time.perf_counter() - start
  rng = np.random.default_rng(0)
  for i in range(_WARMUP.value + _STEPS.value):
    if i == _WARMUP.value:
      start = time.perf_counter()
    rows = rng.integers(0, vocab, shape, dtype=np.int32)
    state, metrics = step(state, jax.device_put(rows, s.batch_sharding))
    jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  tokens_per_s = _STEPS.value * d.global_batch * d.seq_len / seconds
  flops_per_token = analysis.flops_per_token(s.cfg.model, d.seq_len)
  total_peak = peak if shares_host() else devices * peak
  return {
    "layout": s.layout.name,
    "mesh": s.layout.axis_sizes,
    "devices": devices,
    "batch": d.global_batch,
    "seq_len": d.seq_len,
    "vocab_size": s.cfg.model.vocab_size,
    "params": s.n_params,
    "steps": _STEPS.value,
    "step_ms": 1000 * seconds / _STEPS.value,
    "compile_s": compile_s,
    "tokens_per_s": tokens_per_s,
    "tokens_per_s_per_device": tokens_per_s / devices,
    "flops_per_token": flops_per_token,
    "mfu": tokens_per_s * flops_per_token / total_peak,
    "final_loss": float(metrics["loss"]),
    "memory_per_device_bytes": analysis.compiled_memory(step),
    "peak_bytes_in_use": peak_in_use(watched),
  }


def table(kind: str, peak: float, source: str, runs: dict, skipped: str | None) -> list[str]:
  model = (
    f"111M recipe at {TINY['n_layers']} layers, d {TINY['d_model']}, {TINY['n_heads']} "
    f"heads, vocabulary {TINY_VOCAB} (--tiny)"
    if _TINY.value
    else "111M"
  )
  shared = shares_host() and jax.device_count() > 1
  lines = [
    f"# Cerebras-GPT {model}, bfloat16, on {kind}",
    "",
    f"MFU against {peak / 1e12:.3g} TFLOP/s per device: {source}"
    + ("; the virtual CPU devices share it." if shared else "."),
    "",
    "| run | devices | batch x seq | tokens/s | tokens/s per device | MFU | step ms | "
    "compiled memory/device GiB | of which temp GiB | allocator peak GiB |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in runs.items():
    mem = r["memory_per_device_bytes"]
    in_use = "n/a" if r["peak_bytes_in_use"] is None else f"{r['peak_bytes_in_use'] / 2**30:.2f}"
    lines.append(
      f"| {name} | {r['devices']} | {r['batch']} x {r['seq_len']} | "
      f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
      f"{r['mfu']:.3f} | {r['step_ms']:.1f} | {mem['total_bytes'] / 2**30:.2f} | "
      f"{mem['temp_bytes'] / 2**30:.2f} | {in_use} |"
    )
  lines.append("")
  if skipped:
    lines.append(skipped)
  else:
    layout = runs[_LAYOUT.value]
    n = layout["devices"]
    lines.append(
      f"Scaling efficiency of {_LAYOUT.value} over {n} devices (tokens/s over {n} x "
      f"single's): {layout['scaling_efficiency']:.2f}."
    )
  return lines


def main(_):
  out = common.fresh_workdir(_WORKDIR.value)
  devices = jax.devices()
  kind = devices[0].device_kind
  peak, source = chip_peak(kind)
  batch = _BATCH.value or (2 if _TINY.value else 16)
  vocab = TINY_VOCAB if _TINY.value else presets.GPT2_VOCAB
  try:
    runs = {"single": measure(make_config("single", batch), vocab, devices[:1], peak)}
    skipped = None
    if len(devices) == 1:
      skipped = f"{_LAYOUT.value} skipped: only one device."
    else:
      # Devices the single run never touched: the allocator's peak is over the whole process.
      layout = measure(make_config(_LAYOUT.value, batch * len(devices)), vocab, devices[1:], peak)
      layout["scaling_efficiency"] = layout["tokens_per_s"] / (
        len(devices) * runs["single"]["tokens_per_s"]
      )
      runs[_LAYOUT.value] = layout
  except InputError as e:
    sys.exit(f"error: {e}")
  report = {
    "device_kind": kind,
    "device_count": len(devices),
    "peak_flops_per_device": peak,
    "peak_source": source,
    "tiny": _TINY.value,
    "runs": runs,
    "layout_skipped": skipped,
  }
  common.write_report(out, table(kind, peak, source, runs, skipped), report)


if __name__ == "__main__":
  app.run(main)
