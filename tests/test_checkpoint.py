"""Checkpoints: a killed run resumes bit for bit; a checkpoint restores under another layout and
device count; damaged, incomplete and mismatched checkpoints are clear errors that lose nothing."""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import (
  REPO,
  SHAKESPEARE,
  assert_bad_input,
  by_step,
  copy_checkpoint,
  eight_heads,
  files_digest,
  launch,
  launch_command,
  launch_env,
  losses,
)

from cgpt_jax.errors import InputError
from cgpt_jax.train import loop


@pytest.fixture(scope="module")
def fsdp_run(shared_data, data_dir, tmp_path_factory):
  """8 steps under fsdp, checkpoints at 4 and 8: the uninterrupted reference."""
  workdir = tmp_path_factory.mktemp("fsdp")
  loop.run(eight_heads(shared_data, data_dir, "fsdp"), str(workdir))
  return workdir


@pytest.mark.parametrize("layout,sizes", [("tp", {}), ("pp", {"pipe": 2, "data": 4})])
def test_restore_under_another_layout(shared_data, data_dir, fsdp_run, tmp_path, layout, sizes):
  """Saved under fsdp at step 4, resumed under tp or a pipeline: steps 5-8 match the uninterrupted
  fsdp run to the layouts' float32 tolerance."""
  copy_checkpoint(fsdp_run, tmp_path, 4)
  summary = loop.run(eight_heads(shared_data, data_dir, layout, **sizes), str(tmp_path))
  assert summary["resumed_from_step"] == 4
  ref, got = by_step(fsdp_run), by_step(tmp_path)
  assert sorted(got) == list(range(5, 9))
  np.testing.assert_allclose(
    [got[k]["loss"] for k in got], [ref[k]["loss"] for k in got], rtol=1e-5
  )
  np.testing.assert_allclose(got[8]["eval_loss"], ref[8]["eval_loss"], rtol=1e-5)


def test_pipeline_checkpoint_restores_on_one_device(shared_data, data_dir, tmp_path_factory):
  """A pipeline saves its [R, S, K, ...] layers in layer order: a single-device run resumes it."""
  saved, resumed = tmp_path_factory.mktemp("pp"), tmp_path_factory.mktemp("single")
  loop.run(eight_heads(shared_data, data_dir, "pp", pipe=2, data=4), str(saved))
  copy_checkpoint(saved, resumed, 4)
  loop.run(eight_heads(shared_data, data_dir, "single"), str(resumed))
  ref, got = by_step(saved), by_step(resumed)
  np.testing.assert_allclose(
    [got[k]["loss"] for k in got], [ref[k]["loss"] for k in got], rtol=1e-5
  )


# Slow (34 s): four runs. The default run keeps a pipeline checkpoint resumed on one device and an
# fsdp one resumed under pp and tp.
@pytest.mark.slow
def test_checkpoints_move_between_schedules(shared_data, data_dir, tmp_path_factory):
  """GPipe's checkpoint resumes under 1F1B and 1F1B's under GPipe: both store layers in layer
  order. Against an uninterrupted 8-step GPipe run: a 1F1B run from scratch, 1F1B resumed from
  GPipe's step 4, and GPipe resumed from 1F1B's step 4 all give its losses."""

  def run(schedule, workdir):
    c = eight_heads(shared_data, data_dir, "pp", pipe=2, data=4)
    c.pipeline.schedule = schedule
    return loop.run(c, str(workdir))

  gpipe, one_f, to_1f1b, to_gpipe = (
    tmp_path_factory.mktemp(n) for n in ("gpipe", "1f1b", "to_1f1b", "to_gpipe")
  )
  run("gpipe", gpipe)
  run("1f1b", one_f)
  copy_checkpoint(gpipe, to_1f1b, 4)
  copy_checkpoint(one_f, to_gpipe, 4)
  assert run("1f1b", to_1f1b)["resumed_from_step"] == 4
  assert run("gpipe", to_gpipe)["resumed_from_step"] == 4
  want = by_step(gpipe)
  for workdir, steps in ((one_f, range(1, 9)), (to_1f1b, range(5, 9)), (to_gpipe, range(5, 9))):
    got = by_step(workdir)
    assert sorted(got) == list(steps)
    np.testing.assert_allclose(
      [got[k]["loss"] for k in steps], [want[k]["loss"] for k in steps], rtol=1e-5
    )


def test_restore_on_fewer_devices(shared_data, fsdp_run, tmp_path):
  """The 8-device fsdp checkpoint resumes in a 4-device dp process (launch.py --devices 4)."""
  copy_checkpoint(fsdp_run, tmp_path, 4)
  config = json.loads((fsdp_run / "config.json").read_text())
  r = launch(
    SHAKESPEARE,
    f"--config.data.source={shared_data / 'tinyshakespeare' / 'input.txt'}",
    f"--config.data.data_dir={config['data']['data_dir']}",
    "--config.model.preset=tiny",
    "--config.model.n_heads=8",
    "--config.model.scan_unroll=2",
    "--config.data.global_batch=16",
    "--config.data.eval_batch=64",
    "--config.data.eval_batches=4",
    "--config.train.steps=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=6",
    "--config.optim.warmup_steps=2",
    "--config.checkpoint.every=4",
    "--config.train.progress=False",
    "--config.mesh.layout=dp",
    f"--workdir={tmp_path}",
    devices=4,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  ref, got = by_step(fsdp_run), by_step(tmp_path)
  assert sorted(got) == list(range(5, 9))
  np.testing.assert_allclose(
    [got[k]["loss"] for k in got], [ref[k]["loss"] for k in got], rtol=1e-5
  )


# Slow (73 s): a 1500-step run killed mid-way. The default run keeps test_faults' SIGTERM rerun, bit
# for bit as well.
@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(shared_data, tmp_path):
  """SIGKILL a run once its step-50 checkpoint is complete, rerun the same command: every logged
  loss (train and eval) equals an uninterrupted run's, bit for bit. Only the last 3 are kept."""
  flags = [
    f"--config.data.source={shared_data / 'tinyshakespeare' / 'input.txt'}",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
    "--config.model.preset=tiny",
    "--config.train.steps=1500",
    "--config.checkpoint.every=50",
    "--config.train.log_every=1",
    "--config.train.eval_every=500",
    "--config.data.eval_batches=2",
    "--config.train.progress=False",
  ]
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  assert launch(SHAKESPEARE, *flags, f"--workdir={whole}").returncode == 0
  kept = sorted(int(d.name) for d in (whole / "checkpoints").iterdir() if d.name.isdigit())
  assert kept == [1400, 1450, 1500]  # checkpoint.keep=3, the last one at the last step

  cmd = launch_command(SHAKESPEARE, *flags, f"--workdir={killed}")
  env = launch_env()  # one device, as launch() runs
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 300
  while (
    not (killed / "checkpoints" / "50").is_dir() and proc.poll() is None and time.time() < deadline
  ):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] >= 50
  assert losses(killed) == losses(whole)  # exact float equality, train and eval


def test_bad_checkpoints_are_clear_errors_and_lose_nothing(
  shared_data, data_dir, fsdp_run, tmp_path_factory
):
  # Another model's checkpoint.
  other = tmp_path_factory.mktemp("other")
  copy_checkpoint(fsdp_run, other, 4)
  before = files_digest(other)
  c = eight_heads(shared_data, data_dir, "fsdp")
  c.model.d_model = 128
  with pytest.raises(
    InputError,
    match=r"checkpoints/4 is for model.d_model=64, this run has "
    r"model.d_model=128",
  ):
    loop.run(c, str(other))
  assert files_digest(other) == before

  # A damaged checkpoint: its array files truncated.
  damaged = tmp_path_factory.mktemp("damaged")
  copy_checkpoint(fsdp_run, damaged, 8)
  for path in (damaged / "checkpoints" / "8" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 64:
      path.write_bytes(path.read_bytes()[:16])
  before = files_digest(damaged)
  c = eight_heads(shared_data, data_dir, "fsdp")
  c.train.steps = 12
  with pytest.raises(
    InputError, match=r"checkpoints/8 cannot be (read|restored).*Delete that step"
  ):
    loop.run(c, str(damaged))
  assert files_digest(damaged) == before

  # An incomplete save (orbax's temporary directory, never renamed) does not hide step 8.
  incomplete = tmp_path_factory.mktemp("incomplete")
  copy_checkpoint(fsdp_run, incomplete, 8)
  shutil.copytree(
    incomplete / "checkpoints" / "8", incomplete / "checkpoints" / "12.orbax-checkpoint-tmp-1234567"
  )
  summary = loop.run(c, str(incomplete))
  assert summary["resumed_from_step"] == 8


def test_finished_run_is_not_overwritten(shared_data, fsdp_run):
  before = files_digest(fsdp_run)
  r = launch(
    SHAKESPEARE,
    f"--config.data.source={shared_data / 'tinyshakespeare' / 'input.txt'}",
    f"--workdir={fsdp_run}",
  )
  assert_bad_input(r, "already holds a run", "summary.json")
  assert files_digest(fsdp_run) == before
