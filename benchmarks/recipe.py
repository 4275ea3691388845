"""What each training-recipe knob does to per-device memory and FLOPs, from ahead-of-time plans.

  python benchmarks/recipe.py --workdir runs/recipe

Model: the 111M preset (10 layers, d_model 768, GPT-2 vocabulary), 2048-token sequences, planned
(`launch.py --plan`: compiled from abstract shapes, nothing allocated) on one device with batch 8
and under fsdp on 8 virtual devices with batch 32 (4 sequences per device, so 4 micro-steps split
it). Variants: remat none / dots / full, bfloat16 compute (alone and
with full remat), Adafactor instead of AdamW, and 4 gradient-accumulation micro-steps. Every figure
is exact (compiled memory_analysis, compiled matmul FLOPs, optimizer-state bytes from the state's
shapes and shardings), so one run of this script is the whole measurement; ratios are to the
float32 AdamW no-remat plan of the same layout. Writes WORKDIR/report.md and WORKDIR/report.json.
"""

import json
import pathlib
import subprocess
import sys

import common
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

VARIANTS = {  # name -> config overrides
  "baseline (f32, AdamW, no remat)": {},
  "remat dots": {"model.remat": "dots"},
  "remat full": {"model.remat": "full"},
  "bf16": {"model.dtype": "bfloat16"},
  "bf16 + remat full": {"model.dtype": "bfloat16", "model.remat": "full"},
  "Adafactor": {"optim.name": "adafactor"},
  "grad accum 4": {"train.grad_accum": 4},
}
LAYOUTS = {"single": (1, 8), "fsdp": (8, 32)}  # layout -> devices, global batch

_WORKDIR = flags.DEFINE_string("workdir", "runs/recipe", "Where plans and the report go.")


def plan(workdir: pathlib.Path, layout: str, devices: int, batch: int, overrides: dict) -> dict:
  cmd = [
    sys.executable,
    str(REPO / "launch.py"),
    f"--devices={devices}",
    "--plan",
    "--config",
    str(REPO / "experiments/cerebras_gpt.py:111m"),
    f"--workdir={workdir}",
    f"--config.data.tokenizer_path={SHARED / 'gpt2'}",
    f"--config.data.global_batch={batch}",
    f"--config.mesh.layout={layout}",
    *[f"--config.{k}={v}" for k, v in overrides.items()],
  ]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if result.returncode:
    return {"error": result.stderr.strip().splitlines()[-1]}
  return json.loads((workdir / "plan.json").read_text())


def table(results: dict) -> list[str]:
  lines = [
    "| layout | variant | memory/device GiB | vs baseline | activations (temp) GiB "
    "| arguments GiB | optimizer state MiB/device | matmul FLOPs/step (T) | vs baseline |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for layout in LAYOUTS:
    ref = results[layout, next(iter(VARIANTS))]
    for name in VARIANTS:
      p = results[layout, name]
      if "error" in p:
        lines.append(f"| {layout} | {name} | error: {p['error']} |||||||")
        continue
      mem, ref_mem = p["memory_per_device_bytes"], ref["memory_per_device_bytes"]
      flops = p["compiled_matmul_flops_per_step"]
      lines.append(
        f"| {layout} | {name} | {mem['total_bytes'] / 2**30:.2f} | "
        f"{mem['total_bytes'] / ref_mem['total_bytes']:.2f} | {mem['temp_bytes'] / 2**30:.2f} | "
        f"{mem['argument_bytes'] / 2**30:.2f} | "
        f"{p['optimizer_state_bytes_per_device'] / 2**20:.1f} | {flops / 1e12:.2f} | "
        f"{flops / ref['compiled_matmul_flops_per_step']:.3f} |"
      )
  return lines


def main(_):
  out = common.fresh_workdir(_WORKDIR.value)
  results = {}
  for layout, (devices, batch) in LAYOUTS.items():
    for i, (name, overrides) in enumerate(VARIANTS.items()):
      results[layout, name] = plan(out / f"{layout}-{i}", layout, devices, batch, overrides)
      print(layout, name, results[layout, name].get("error", "planned"), flush=True)
  lines = table(results)
  common.write_report(out, lines, {f"{l} / {n}": r for (l, n), r in results.items()})


if __name__ == "__main__":
  app.run(main)
