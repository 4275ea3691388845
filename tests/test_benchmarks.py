"""The timing benchmarks as a user runs them, at their smallest: each writes a report whose numbers
hang together (the figures themselves are this machine's, not the test's)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO


def bench(
  script: str, workdir, *args, devices: int = 1, pythonpath: str | None = None
) -> tuple[dict, str]:
  """(report.json, stdout) of benchmarks/SCRIPT run on `devices` virtual CPU devices."""
  # The suite's XLA flags (conftest.py), with this run's device count.
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env = {
    **os.environ,
    "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
  }
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  r = subprocess.run(
    [sys.executable, str(REPO / "benchmarks" / script), f"--workdir={workdir}", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads((workdir / "report.json").read_text()), r.stdout


def assert_rate(side: dict, flops_per_token: int, peak: float) -> None:
  assert side["tokens_per_s"] > 0
  assert 0 < side["mfu"] < 1.5
  assert side["mfu"] == pytest.approx(side["tokens_per_s"] * flops_per_token / peak, rel=1e-12)


PEERS = ("peers.py", "--shapes=char", "--steps=2", "--warmup=1")


def check_char(report: dict) -> dict:
  """The char shape's entry, our side checked."""
  assert report["matmul_peak_flops"] > 0
  assert list(report["shapes"]) == ["char"]
  r = report["shapes"]["char"]
  assert (
    r["n_layers"],
    r["d_model"],
    r["n_heads"],
    r["vocab_size"],
    r["batch"],
    r["seq_len"],
    r["steps"],
  ) == (4, 128, 4, 65, 12, 64, 2)
  assert_rate(r["ours"], r["flops_per_token"], report["matmul_peak_flops"])
  return r


def test_peers_times_both_sides(tmp_path):
  report, stdout = bench(*PEERS[:1], tmp_path, *PEERS[1:])
  r = check_char(report)
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    assert report["peer_skipped"] and r["peer"] is None
    assert "peer skipped: torch/transformers not installed" in stdout
    return
  assert not report["peer_skipped"]
  assert_rate(r["peer"], r["flops_per_token"], report["matmul_peak_flops"])
  assert r["ratio"] == pytest.approx(
    r["ours"]["tokens_per_s"] / r["peer"]["tokens_per_s"], rel=1e-12
  )
  assert "| char |" in (tmp_path / "report.md").read_text()


@pytest.mark.skipif(
  importlib.util.find_spec("torch") is None,
  reason="without torch, test_peers_times_both_sides runs this path",
)
def test_peers_without_torch_reports_ours(tmp_path):
  """A torch that fails to import (as when requirements-hf.txt is not installed): one line says the
  peer is skipped, and our side is still reported."""
  fake = tmp_path / "fake"
  (fake / "torch").mkdir(parents=True)
  (fake / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
  report, stdout = bench(*PEERS[:1], tmp_path / "out", *PEERS[1:], pythonpath=str(fake))
  assert (
    "peer skipped: torch/transformers not installed (pip install -r requirements-hf.txt)" in stdout
  )
  assert report["peer_skipped"]
  r = check_char(report)
  assert r["peer"] is None and "ratio" not in r


def test_gpu_tiny_on_eight_cpu_devices(tmp_path):
  report, _ = bench("gpu.py", tmp_path, "--tiny", "--steps=2", "--warmup=1", devices=8)
  assert report["device_kind"] == "cpu" and report["device_count"] == 8
  assert "measured" in report["peak_source"]  # no datasheet peak for a CPU
  assert report["layout_skipped"] is None
  runs = report["runs"]
  assert list(runs) == ["single", "fsdp"]
  assert (runs["single"]["devices"], runs["single"]["batch"]) == (1, 2)
  assert (runs["fsdp"]["devices"], runs["fsdp"]["batch"]) == (8, 16)  # 2 sequences per device
  for r in runs.values():
    # The virtual devices share the host's measured peak (gpu.shares_host).
    assert_rate(r, r["flops_per_token"], report["peak_flops_per_device"])
    assert r["memory_per_device_bytes"]["total_bytes"] > 0
    assert r["seq_len"] == 64
  assert runs["fsdp"]["scaling_efficiency"] == pytest.approx(
    runs["fsdp"]["tokens_per_s"] / (8 * runs["single"]["tokens_per_s"]), rel=1e-12
  )
  assert "| fsdp | 8 |" in (tmp_path / "report.md").read_text()


def test_step_profile_accounts_for_the_whole_step(tmp_path, data_flags):
  """The default experiment's step, op by op: every op of the compiled step is filed under a kind
  and a model part, and the parts add up to the traced span."""
  report, _ = bench(
    "step_profile.py",
    tmp_path,
    "--config=experiments/shakespeare_char.py",
    *data_flags,
    "--steps=2",
    "--traced_steps=1",
  )
  parts = {key.split("|")[1] for key in report["seconds_per_step"]}
  # Every named scope of the model and the step shows up, forward and backward.
  assert {
    "embed",
    "attention",
    "mlp",
    "head",
    "loss",
    "optimizer",
    "attention (backward)",
    "mlp (backward)",
    "head (backward)",
    "loss (backward)",
  } <= parts
  kinds = {key.split("|")[0] for key in report["seconds_per_step"]}
  assert {"matmul", "elementwise/reduce"} <= kinds
  total = sum(report["seconds_per_step"].values())
  assert total == pytest.approx(sum(op["s"] for op in report["ops"]), rel=1e-9)
  # Concurrent ops share their instants and gaps go to an op: the rows are the traced span.
  assert total == pytest.approx(report["traced_span_per_step_s"], rel=1e-9)
  assert report["seconds_per_step"]["matmul|head"] > 0
  assert 0 < report["mfu"] < 1.5 and 0 < report["matmul_only_mfu"] < 1.5
  assert (tmp_path / "step.hlo").read_text().startswith("HloModule")
