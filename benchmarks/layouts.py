"""Every layout on 8 virtual CPU devices against `single`, measured in one invocation.

  python benchmarks/layouts.py --workdir runs/layouts

Model: the 111M widths (d_model 768, d_ff 3072, GPT-2 vocabulary 50257) with 2 layers and 8 heads
of 96 (so every layout can put all 8 devices on one axis), batch 8 x 256 tokens: big enough that
matmuls dominate. Each layout runs in its own process (the device count is fixed at start). Reports
tokens/s and per-device memory against single, and collective bytes measured in the compiled HLO
against the analytic value of REFERENCE.md §2. Writes WORKDIR/report.md and WORKDIR/report.json.

The 8 devices share this machine's cores, so the tokens/s ratios measure replicated work and
collective copies, not a real interconnect; bytes and memory are exact.
"""
import json
import pathlib
import subprocess
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

MESHES = [  # (name, layout, axis-size overrides)
    ("single", "single", {}),
    ("dp", "dp", {}),
    ("zero1", "zero1", {}),
    ("fsdp", "fsdp", {}),
    ("tp", "tp", {}),
    ("sp", "sp", {}),
    ("dp2 x tp4", "tp", {"data": 2, "tensor": 4}),
    ("fsdp2 x tp4", "fsdp", {"fsdp": 2, "tensor": 4}),
]

_WORKDIR = flags.DEFINE_string("workdir", "runs/layouts", "Where runs and the report go.")
_STEPS = flags.DEFINE_integer("steps", 6, "Training steps per layout.")


def run(workdir: pathlib.Path, layout: str, sizes: dict) -> dict:
  steps = _STEPS.value
  cmd = [sys.executable, str(REPO / "launch.py"), "--devices=8",
         "--config", str(REPO / "experiments/cerebras_gpt.py:111m"), f"--workdir={workdir}",
         f"--config.data.source={SHARED / 'tinyshakespeare' / 'input.txt'}",
         f"--config.data.tokenizer_path={SHARED / 'gpt2'}",
         "--config.model.n_layers=2", "--config.model.n_heads=8",
         "--config.data.seq_len=256", "--config.data.global_batch=8", "--config.data.eval_batches=1",
         f"--config.train.steps={steps}", "--config.optim.warmup_steps=1",
         f"--config.train.eval_every={steps}", "--config.train.log_every=1",
         "--config.train.progress=False", f"--config.mesh.layout={layout}",
         *[f"--config.mesh.{axis}={n}" for axis, n in sizes.items()]]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if result.returncode:
    return {"error": result.stderr.strip().splitlines()[-1]}
  return json.loads((workdir / "summary.json").read_text())


def main(_):
  out = pathlib.Path(_WORKDIR.value).resolve()
  if out.exists() and any(out.iterdir()):
    sys.exit(f"error: --workdir {out} is not empty; choose a new one")
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  for i, (name, layout, sizes) in enumerate(MESHES):
    results[name] = run(out / f"{i}-{layout}", layout, sizes)
    print(name, "error" in results[name] and results[name]["error"] or "done", flush=True)
  ref = results["single"]
  lines = ["| layout | mesh (data x fsdp x tensor) | tokens/s | vs single | memory/device GiB | vs single "
           "| collective MB/step measured | analytic | measured/analytic | final loss - single |",
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
        f"| {name} | {mesh['data']} x {mesh['fsdp']} x {mesh['tensor']} | {s['tokens_per_s']:,.0f} | "
        f"{s['tokens_per_s'] / ref['tokens_per_s']:.2f} | {memory / 2**30:.2f} | "
        f"{memory / ref['memory_per_device_bytes']['total_bytes']:.2f} | {measured / 1e6:.1f} | "
        f"{analytic / 1e6:.1f} | {measured / analytic if analytic else float('nan'):.2f} | "
        f"{s['final_loss'] - ref['final_loss']:+.1e} |")
  (out / "report.md").write_text("\n".join(lines) + "\n")
  (out / "report.json").write_text(json.dumps(results, indent=2))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
