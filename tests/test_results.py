"""One definition per quantity, and the results files the docs link (docs/results/NAME.md).

The analytic memory model (cgpt_jax/costs/memory.py), the parameter and FLOP counts, the CS-2
streaming table (costs/roofline.py) and the report tables moved out of experiments/ against values
worked out by hand from their formulas; a sweep's `--results` file written by its report hook, and
the coordinate-check benchmark's."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from helpers import REPO, assert_bad_input, experiment, launch, launch_env

from cgpt_jax import presets, report_scaling, sweep
from cgpt_jax import report as report_lib
from cgpt_jax.costs import analysis, memory, roofline

# One block of width d = 2 with d_ff = 8, vocabulary 3, context T = 5.
TINY = ml_collections.ConfigDict(dict(n_layers=1, d_model=2, d_ff=8, vocab_size=3))


# --- the memory model ---------------------------------------------------------------------------


def test_state_bytes_per_parameter_name_their_terms():
  # Kept between steps: float32 parameters (4) and Adam's two float32 moments (8); a step holds the
  # float32 gradients (4) besides.
  assert memory.STATE_BYTES_PER_PARAM == 4 + 8 == 12
  assert memory.STEP_BYTES_PER_PARAM == 4 + 4 + 8 == 16
  assert memory.step_state_bytes(1000, 8) == 16 * 1000 / 8 == 2000


def test_analytic_state_bytes_are_parameters_and_moments():
  """One block of d = 2, f = 8 on one device, 100 parameters stored: 12 bytes each. Under ZeRO-1
  over 4 data devices the moments (8 bytes) split 4 ways and the parameters (4) do not."""
  one = dict(data=1, pipe=1, fsdp=1, tensor=1)
  assert analysis.analytic_state_bytes(one, TINY, 100, 3, zero1=False) == 1200
  zero1 = dict(data=4, pipe=1, fsdp=1, tensor=1)
  assert analysis.analytic_state_bytes(zero1, TINY, 100, 3, zero1=True) == 4 * 100 + 8 * 100 // 4


def test_activation_bytes_per_row_by_hand():
  # 128 positions x 4 bytes x (2 blocks' inputs of width 64 + 3 copies of 256 / 2 logits).
  assert memory.activation_bytes_per_row(2, 64, 128, 256, 2) == 128 * 4 * (128 + 384) == 262_144


@pytest.mark.parametrize(
  "per_row, k",
  [
    (1e9, 1),  # 12 rows, 12 GB: fits the 30 GB left beside 10 GB of state
    (4e9, 2),  # at most 7.5 rows: 6 per micro-step
    (5e9, 2),  # at most 6 rows
    (6e9, 3),  # at most 5 rows: 4 (12 / 5 is not a whole number of micro-steps)
    (40e9, 12),  # nothing fits: one row per micro-step
  ],
)
def test_grad_accum_is_the_fewest_micro_steps_that_fit(per_row, k):
  assert memory.grad_accum(12, per_row, 10e9, budget=40e9) == k


# --- parameter and FLOP counts: one formula each --------------------------------------------------


def test_parameter_counts_by_hand():
  # Matrices: QKV and out 4 d^2 = 16, MLP 2 d f = 32. Biases: QKV 3 d, out d, MLP-in f, MLP-out d
  # = 18; two layer norms 4 d = 8.
  assert presets.layer_matrix_params(2, 8) == 48
  assert presets.layer_params(2, 8) == 48 + 18 + 8 == 74
  assert analysis.layer_params(TINY) == 74 and analysis.layer_matmul_params(TINY) == 48
  # (V + P) d + L (12 d^2 + 13 d) + 2 d with V 3, P 4, d 2.
  assert presets.closed_form_params(1, 2, vocab=3, positions=4) == 14 + 74 + 4
  # 111M: 12 * 768^2 + 13 * 768 per layer, the GPT-2 vocabulary and 2048 positions.
  per_layer = 12 * 768**2 + 13 * 768
  assert presets.closed_form_params(10, 768) == 52305 * 768 + 10 * per_layer + 2 * 768


def test_flops_per_token_is_the_blocks_plus_the_head():
  # Blocks: 6 x 48 + 12 L T d = 288 + 120; head: 6 V d = 36.
  assert analysis.layer_matmul_flops_per_token(TINY, 5) == 408
  assert analysis.flops_per_token(TINY, 5) == 408 + 36


def test_cs2_streaming_table_by_hand():
  """111M on one CS-2 at its paper batch of 120 x 2048 tokens: 6 bytes per parameter through
  150 GB/s of system I/O, against 6 N_matmul + 12 L T d FLOPs per token at 7.5 PFLOP/s."""
  row = roofline.cs2_streaming_table()[0]
  params = 111_050_496
  flops_per_token = 6 * (10 * (4 * 768**2 + 2 * 768 * 3072) + 50257 * 768) + 12 * 10 * 2048 * 768
  assert row["model"] == "111m" and row["params"] == params
  assert row["stream_s"] == pytest.approx(6 * params / 150e9)
  assert row["compute_s_at_peak"] == pytest.approx(flops_per_token * 120 * 2048 / 7.5e15)
  assert row["bound"] == "compute"  # 3.5 s of compute against 4.4 ms of streaming


# --- report tables moved out of experiments/ -----------------------------------------------------


def test_compile_time_table_by_hand():
  results = {
    "L2": {
      "compile_s": 2.0,
      "compiled_matmul_flops_per_step": 6,
      "expected_matmul_flops_per_step": 6,
    },
    "L10": {
      "compile_s": 3.0,
      "compiled_matmul_flops_per_step": 9,
      "expected_matmul_flops_per_step": 8,
    },
    "L24": {"error": "exit 1: boom"},
  }
  lines = report_lib.compile_time_table(results, (2, 10, 24), "a setting")
  assert lines[0] == "## Compile time against depth (a setting)"
  assert "| / 2 layers |" in lines[2]
  assert lines[4:] == [
    "| 2 | 2.00 | 1.00 | 1.0000 |",
    "| 10 | 3.00 | 1.50 | 1.1250 |",
    "| 24 | error: exit 1: boom | | |",
  ]


def test_long_context_table_by_hand():
  """A ring of 4 at a quarter of single's memory, its ppermute bytes on the formula, a sixth more
  bytes elsewhere, and (2N+1)/(4N) = 9/16 of the scores: per-token FLOPs 0.6 of single's."""
  gib = 2**30
  mesh = {"data": 1, "pipe": 1, "fsdp": 1, "tensor": 1}
  single = {
    "mesh": {**mesh, "context": 1},
    "memory_per_device_bytes": {"total_bytes": 8 * gib, "temp_bytes": 6 * gib},
    "analytic_collective_terms": {},
    "collective_bytes_per_step": {},
    "analytic_collective_bytes_per_step": 0,
    "compiled_matmul_flops_per_step": 1000,
    "tokens_per_step": 10,
  }
  ring = {
    "mesh": {**mesh, "context": 4},
    "memory_per_device_bytes": {"total_bytes": 2 * gib, "temp_bytes": 1 * gib},
    "analytic_collective_terms": {
      "context_kv_ring": 30e6,
      "context_kv_grad_ring": 30e6,
      "grad_allreduce": 12e6,
    },
    "collective_bytes_per_step": {"collective-permute": 60e6, "all-reduce": 12e6},
    "analytic_collective_bytes_per_step": 72e6,
    "compiled_matmul_flops_per_step": 1200,
    "tokens_per_step": 20,
    "context": {"score_fraction": 0.5625},
  }
  lines = report_lib.long_context_table({"single": single, "cp4": ring, "cp8": {"error": "x"}}, 64)
  assert lines[0] == "## T = 64: memory per device and bytes per step"
  assert lines[4:] == [
    "| single | 1 x 1 x 1 x 1 x 1 | 8.00 | 1.000 | 6.00 | 0.0 | 0.0 | 0.0 | 1.0000 | 1.000 "
    "| 1.0000 |",
    "| cp4 | 1 x 1 x 1 x 4 x 1 | 2.00 | 0.250 | 1.00 | 60.0 | 60.0 | 72.0 | 1.0000 | 0.600 "
    "| 0.5625 |",
    "| cp8 | error: x |" + " |" * 9,
  ]


def scaling_results(tmp_path):
  """Five sizes whose losses follow (f / 3e9)^-0.15 + 1.2 exactly, one failed size, and the point
  folders' files 40 s apart (point.json to summary.json: the process's wall time)."""
  results, sizes = {}, {}
  for k in range(5):
    name = f"s{k}"
    params, steps = 1000 * 2**k, 10
    tokens = 20 * params
    per_step = 6.0 * params * tokens / steps
    flops = per_step * steps
    results[name] = {
      "params": params,
      "tokens": tokens,
      "steps": steps,
      "model_flops_per_step": per_step,
      "final_eval_loss": float((flops / 3e9) ** -0.15 + 1.2),
      "tokens_per_s": 5000.0,
      "train_wall_s": 30.0,
      "metrics": [{"step": s, "loss": 4.0 - 0.1 * s} for s in range(1, steps + 1)],
    }
    sizes[name] = {"n_layers": k + 1, "d_model": 32, "lr": 2e-3}
    folder = tmp_path / "points" / name
    folder.mkdir(parents=True)
    for file, t in (("point.json", 1000), ("summary.json", 1040)):
      (folder / file).write_text("{}")
      os.utime(folder / file, (t, t))
  results["s5"] = {"error": "exit 3: diverged"}
  return results, sizes


def test_scaling_report_by_hand(tmp_path):
  results, sizes = scaling_results(tmp_path)
  sweep_points = [{"name": name} for name in results]
  lines = report_scaling.scaling_report(
    sweep_points, results, tmp_path, sizes, 80_000, 100, "a title", notes=["## Notes"]
  )
  assert lines[0] == "- `s5` failed: exit 3: diverged"
  # s0: 1,000 params, 20,000 tokens (20 per parameter, a quarter of the 80,000 training tokens),
  # batch 20,000 / 10 steps / 100 positions = 20, 6 N D = 1.2e8 training FLOPs.
  row = next(l for l in lines if l.startswith("| s0 |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:11] == [
    "s0",
    "1",
    "32",
    "1,000",
    "20,000",
    "20.00",
    "0.25",
    "20",
    "10",
    "0.002",
    "1.2e+08",
  ]
  loss = (1.2e8 / 3e9) ** -0.15 + 1.2
  assert float(cells[11]) == pytest.approx(loss, abs=1e-4)
  assert float(cells[12]) == pytest.approx(loss, abs=1e-3)  # the law fits these points exactly
  assert cells[13:] == ["5,000", "30", "40"]
  assert "Wall time of the sweep's processes: 200 s, of which training" in "\n".join(lines)
  fitted = next(l for l in lines if l.startswith("| this sweep (5 sizes)"))
  assert "**0.15" in fitted
  assert "![validation loss against training FLOPs](scaling.png)" in lines
  assert lines[-1] == "## Notes" and (tmp_path / "scaling.png").stat().st_size > 10_000


# --- results files ------------------------------------------------------------------------------


def test_write_results_heads_the_file_and_copies_its_images(tmp_path):
  workdir, docs = tmp_path / "run", tmp_path / "docs"
  workdir.mkdir()
  docs.mkdir()
  (workdir / "layouts.png").write_bytes(b"png bytes")
  (workdir / "ablate.png").write_bytes(b"other bytes")
  lines = ["# Title", "![layouts](layouts.png)", "x ![b](ablate.png) y", "![gone](missing.png)"]
  command = ["python", "launch.py", "--config=experiments/ablate.py", "--workdir=runs/a b"]
  path = report_lib.write_results(docs / "ablate.md", command, lines, workdir)
  assert path.read_text().splitlines() == [
    "Regenerate with `python launch.py --config=experiments/ablate.py '--workdir=runs/a b'` "
    "(it rewrites this file).",
    "",
    "# Title",
    "![layouts](ablate_layouts.png)",  # named after the results file, beside it
    "x ![b](ablate.png) y",  # already is
    "![gone](missing.png)",  # not in the workdir: left as it was
  ]
  assert (docs / "ablate_layouts.png").read_bytes() == b"png bytes"
  assert (docs / "ablate.png").read_bytes() == b"other bytes"


def finished_compile_time_sweep(workdir, compile_s=(2.0, 2.2, 2.4)):
  """experiments/compile_time.py's points as if planned: a sweep rerun only reports them."""
  module = experiment("compile_time")
  for point, seconds in zip(sweep.points(module, None, 1), compile_s, strict=True):
    folder = workdir / "points" / point.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "point.json").write_text(json.dumps(point.record({})))
    plan = {"compile_s": seconds, "compiled_matmul_flops_per_step": 10}
    (folder / "plan.json").write_text(json.dumps({**plan, "expected_matmul_flops_per_step": 10}))
  return module


def test_sweep_report_writes_the_results_file(tmp_path):
  workdir, results = tmp_path / "run", tmp_path / "compile_time.md"
  module = finished_compile_time_sweep(workdir)
  sweep.run(module, "experiments/compile_time.py", str(workdir), {}, 1, results_file=str(results))
  lines = results.read_text().splitlines()
  assert lines[0] == (
    f"Regenerate with `python launch.py --config=experiments/compile_time.py "
    f"--workdir={workdir} --results={results}` (it rewrites this file)."
  )
  assert lines[2:] == (workdir / "report.md").read_text().splitlines()  # the sweep's own report
  assert "| 10 | 2.20 | 1.10 | 1.0000 |" in lines and "| 24 | 2.40 | 1.20 | 1.0000 |" in lines


def test_rerunning_the_documented_command_refreshes_the_file(tmp_path):
  """launch.py --results as the docs give it; a rerun after a point's result changed rewrites the
  file with the new number, and the file's first line is that very command."""
  workdir, results = tmp_path / "run", tmp_path / "compile_time.md"
  finished_compile_time_sweep(workdir)
  args = ["--config=experiments/compile_time.py", f"--workdir={workdir}", f"--results={results}"]
  r = launch(*args)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"results -> {results}" in r.stdout
  first = results.read_text().splitlines()[0]
  assert first == f"Regenerate with `python launch.py {' '.join(args)}` (it rewrites this file)."
  assert "| 24 | 2.40 | 1.20 | 1.0000 |" in results.read_text()

  finished_compile_time_sweep(workdir, compile_s=(2.0, 2.2, 3.0))  # a newer result for L24
  again = launch(*args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert results.read_text().splitlines()[0] == first
  assert "| 24 | 3.00 | 1.50 | 1.0000 |" in results.read_text()


@pytest.mark.parametrize(
  "args, phrase",
  [
    (["--config=experiments/compile_time.py", "--nosweep"], "which --nosweep does not run"),
    (["--config=experiments/shakespeare_char.py"], "defines no get_sweep()"),
    (["--config=experiments/compile_time.py"], "a Markdown file in an existing folder"),
  ],
)
def test_results_needs_a_sweep_and_a_place(tmp_path, args, phrase):
  target = tmp_path / ("no_folder/x.md" if "existing folder" in phrase else "x.md")
  r = launch(*args, f"--workdir={tmp_path / 'run'}", f"--results={target}")
  assert_bad_input(r, phrase)
  assert not target.exists() and not (tmp_path / "run").exists()


def test_coord_check_writes_its_results_file(tmp_path):
  """The muP coordinate check at its smallest: its report, plot and results file agree."""
  docs = tmp_path / "docs"
  docs.mkdir()
  flags = ["--widths=64,128", "--steps=1", "--layers=1", "--batch=2", "--seq_len=16"]
  command = [
    "benchmarks/coord_check.py",
    f"--workdir={tmp_path / 'run'}",
    *flags,
    f"--results={docs / 'coord_check.md'}",
  ]
  r = subprocess.run(
    [sys.executable, *command],
    cwd=REPO,
    env={**launch_env(), "CGPT_DATA_DIR": str(tmp_path / "tfds")},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  lines = (docs / "coord_check.md").read_text().splitlines()
  assert lines[0] == f"Regenerate with `python {' '.join(command)}` (it rewrites this file)."
  assert lines[2:] == (tmp_path / "run" / "report.md").read_text().splitlines()
  assert lines[-1] == "![coordinate check](coord_check.png)"
  assert (docs / "coord_check.png").read_bytes() == (
    tmp_path / "run" / "coord_check.png"
  ).read_bytes()
  report = json.loads((tmp_path / "run" / "report.json").read_text())
  rms = report["rms"]["muP 128"][-1]["block 1"]
  assert (
    f"| muP | 128 | {report['rms']['muP 128'][-1]['embedding']:.3g} | {rms:.3g} |"
    in "\n".join(lines)
  )
  assert np.isfinite([row["logits"] for rows in report["rms"].values() for row in rows]).all()
