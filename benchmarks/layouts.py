"""Every layout on 8 virtual CPU devices against `single`, measured in one invocation.

  python benchmarks/layouts.py --workdir runs/layouts

Model: the 111M widths (d_model 768, d_ff 3072, GPT-2 vocabulary 50257) with 4 layers and 8 heads
of 96 (so every layout can put all 8 devices on one axis, and 4 pipeline stages hold a layer
each), batch 16 x 128 tokens: big enough that matmuls dominate. Each layout runs in its own process
(the device count is fixed at start). Reports tokens/s and per-device memory against single,
collective bytes measured in the compiled HLO against the analytic value of REFERENCE.md §2, and for
pipelines the bubble theory beside the measured step-time and compiled-FLOPs ratios, for the wafer
the streamed bytes against theirs. Writes WORKDIR/report.md and WORKDIR/report.json.

The 8 devices share this machine's cores, so the tokens/s ratios measure replicated work and
collective copies, not a real interconnect; bytes, FLOPs and memory are exact.
"""
import json
import pathlib
import subprocess
import sys

from absl import app, flags

import common

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

PP = {"mesh.layout": "pp"}
MESHES = {  # name -> config overrides
    "single": {"mesh.layout": "single"},
    "dp": {"mesh.layout": "dp"},
    "zero1": {"mesh.layout": "zero1"},
    "fsdp": {"mesh.layout": "fsdp"},
    "tp": {"mesh.layout": "tp"},
    "sp": {"mesh.layout": "sp"},
    "dp2 x tp4": {"mesh.layout": "tp", "mesh.data": 2, "mesh.tensor": 4},
    "fsdp2 x tp4": {"mesh.layout": "fsdp", "mesh.fsdp": 2, "mesh.tensor": 4},
    "gpipe S4 M4 x dp2": {**PP, "mesh.pipe": 4, "mesh.data": 2, "pipeline.microbatches": 4},
    "gpipe S4 M8 x dp2": {**PP, "mesh.pipe": 4, "mesh.data": 2, "pipeline.microbatches": 8},
    "gpipe S4 M8 x dp2, remat": {**PP, "mesh.pipe": 4, "mesh.data": 2, "pipeline.microbatches": 8,
                                 "model.remat": "full"},
    "gpipe S2 M4 x dp4": {**PP, "mesh.pipe": 2, "mesh.data": 4, "pipeline.microbatches": 4},
    "circular S2 R2 M4 x dp4": {**PP, "mesh.pipe": 2, "mesh.data": 4, "pipeline.microbatches": 4,
                                "pipeline.schedule": "circular", "pipeline.repeats": 2},
    "3d (dp2 x pp2 x tp2) M4": {"mesh.layout": "3d", "pipeline.microbatches": 4},
    "fsdp, remat": {"mesh.layout": "fsdp", "model.remat": "full"},
    "wafer": {"mesh.layout": "wafer"},
    "swarm (2 wafers of 4)": {"mesh.layout": "swarm"},
}

_WORKDIR = flags.DEFINE_string("workdir", "runs/layouts", "Where runs and the report go.")
_STEPS = flags.DEFINE_integer("steps", 6, "Training steps per layout.")


def run(workdir: pathlib.Path, overrides: dict) -> dict:
  steps = _STEPS.value
  cmd = [sys.executable, str(REPO / "launch.py"), "--devices=8",
         "--config", str(REPO / "experiments/cerebras_gpt.py:111m"), f"--workdir={workdir}",
         f"--config.data.source={SHARED / 'tinyshakespeare' / 'input.txt'}",
         f"--config.data.tokenizer_path={SHARED / 'gpt2'}",
         "--config.model.n_layers=4", "--config.model.n_heads=8",
         "--config.data.seq_len=128", "--config.data.global_batch=16", "--config.data.eval_batches=1",
         f"--config.train.steps={steps}", "--config.optim.warmup_steps=1",
         f"--config.train.eval_every={steps}", "--config.train.log_every=1",
         "--config.train.progress=False", "--config.checkpoint.every=0",
         *[f"--config.{k}={v}" for k, v in overrides.items()]]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if result.returncode:
    return {"error": result.stderr.strip().splitlines()[-1]}
  return json.loads((workdir / "summary.json").read_text())


def layouts_table(results: dict) -> list[str]:
  ref = results["single"]
  lines = ["| layout | mesh (data x pipe x fsdp x tensor) | tokens/s | vs single | memory/device GiB "
           "| vs single | collective MB/step measured | analytic | measured/analytic "
           "| final loss - single |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, s in results.items():
    if "error" in s:
      lines.append(f"| {name} | error: {s['error']} |||||||||")
      continue
    mesh = s["mesh"]
    measured = sum(s["collective_bytes_per_step"].values())
    analytic = s["analytic_collective_bytes_per_step"]
    memory = s["memory_per_device_bytes"]["total_bytes"]
    lines.append(
        f"| {name} | {mesh['data']} x {mesh['pipe']} x {mesh['fsdp']} x {mesh['tensor']} | "
        f"{s['tokens_per_s']:,.0f} | {s['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
        f"{memory / 2**30:.2f} | {memory / ref['memory_per_device_bytes']['total_bytes']:.2f} | "
        f"{measured / 1e6:.1f} | {analytic / 1e6:.1f} | "
        f"{measured / analytic if analytic else float('nan'):.2f} | "
        f"{s['final_loss'] - ref['final_loss']:+.1e} |")
  return lines


def pipeline_table(results: dict) -> list[str]:
  """Bubble theory beside what was measured: step time against single (the 8 devices share 2
  cores, so bubble work costs time like any other work) and compiled FLOPs against single's."""
  ref = results["single"]
  lines = ["| pipeline | S | M | R | bubble (S-1)/(MR+S-1) | layer FLOPs ratio (MR+S-1)/(MR) "
           "| step FLOPs ratio theory | measured | step time vs single | ppermute MB measured "
           "| per-hop analytic |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, s in results.items():
    if "pipeline" not in s:
      continue
    p = s["pipeline"]
    lines.append(
        f"| {name} | {p['stages']} | {p['microbatches']} | {p['repeats']} | "
        f"{p['bubble_fraction_theory']:.3f} | {p['layer_flops_ratio_theory']:.3f} | "
        f"{p['step_flops_ratio_theory']:.3f} | {p['step_flops_ratio_measured']:.3f} | "
        f"{s['step_ms'] / ref['step_ms']:.2f} | "
        f"{s['collective_bytes_per_step'].get('collective-permute', 0) / 1e6:.1f} | "
        f"{s['analytic_collective_terms']['pipeline_hops'] / 1e6:.1f} |")
  return lines


def wafer_table(results: dict) -> list[str]:
  """Weight streaming: bytes streamed inside the layer scan against 3 P_layers b (n-1)/n, and the
  working set (temp: activations plus the layer streamed in) beside the sharded store (arguments)."""
  ref = results["single"]["memory_per_device_bytes"]
  lines = ["| layout | streamed MB/step measured | analytic | measured/analytic | working set MiB "
           "| vs single | store MiB/device | vs single |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, s in results.items():
    if "wafer" not in s:
      continue
    w, memory = s["wafer"], s["memory_per_device_bytes"]
    lines.append(
        f"| {name} | {w['streamed_bytes_per_step'] / 1e6:.1f} | "
        f"{w['analytic_streamed_bytes_per_step'] / 1e6:.1f} | "
        f"{w['streamed_bytes_per_step'] / w['analytic_streamed_bytes_per_step']:.3f} | "
        f"{memory['temp_bytes'] / 2**20:.0f} | {memory['temp_bytes'] / ref['temp_bytes']:.2f} | "
        f"{memory['argument_bytes'] / 2**20:.0f} | {memory['argument_bytes'] / ref['argument_bytes']:.2f} |")
  return lines


def main(_):
  out = common.fresh_workdir(_WORKDIR.value)
  results = {}
  for i, (name, overrides) in enumerate(MESHES.items()):
    results[name] = run(out / str(i), overrides)
    print(name, results[name].get("error", "done"), flush=True)
  lines = layouts_table(results) + [""] + pipeline_table(results) + [""] + wafer_table(results)
  common.write_report(out, lines, results)


if __name__ == "__main__":
  app.run(main)
