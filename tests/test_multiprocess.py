"""Several processes joined by jax.distributed on 127.0.0.1: the same losses as one process, resume
across processes, and a bounded, clean failure when one process dies."""

import json
import shutil
import signal
import socket
import subprocess
import time

import helpers
import numpy as np
import portpicker
import psutil
import pytest
from helpers import REPO, assert_bad_input, launch_command, launch_env, metrics

from cgpt_jax import distributed
from cgpt_jax.errors import InputError

STEPS = 6
# fsdp over every device of both processes: parameters, optimizer state and batch are split
# across the processes, so each step all-gathers and reduces through gloo.
TINY = [
  "--config=experiments/shakespeare_char.py",
  "--config.model.n_layers=2",
  f"--config.train.steps={STEPS}",
  "--config.optim.warmup_steps=2",
  "--config.train.log_every=1",
  "--config.train.eval_every=3",
  "--config.train.progress=False",
  "--config.data.global_batch=16",
  "--config.data.eval_batch=16",
  "--config.data.eval_batches=2",
  "--config.mesh.layout=fsdp",
]
RUN_TIMEOUT_S = 300  # a bound on every launch, far above what a run takes
FAIL_WITHIN_S = 30  # a kill must end the whole run within this


def launch(*args):
  """launch.py ARGS, finished; the device count is ARGS' own --devices (launch.py sets it)."""
  return helpers.launch(*args, devices=None, timeout=RUN_TIMEOUT_S)


def start(log, *args):
  return subprocess.Popen(launch_command(*args), cwd=REPO, env=launch_env(), stdout=log, stderr=log)


def losses(workdir, key="loss"):
  return [(r["step"], r[key]) for r in metrics(workdir) if key in r]


def assert_same_losses(got, ref):
  """Every logged step, to rtol 1e-5 as the layout tests: splitting a sum over processes only
  reorders float32 additions."""
  for key in ("loss", "eval_loss"):
    g, r = losses(got, key), losses(ref, key)
    assert [s for s, _ in g] == [s for s, _ in r], key
    np.testing.assert_allclose([v for _, v in g], [v for _, v in r], rtol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_flags):
  """The same run in one process of 8 devices and in 2 processes of 4, checkpointed every 3
  steps."""
  root = tmp_path_factory.mktemp("runs")
  for name, flags in (("one", ["--devices=8"]), ("two", ["--devices=4", "--processes=2"])):
    r = launch(
      *TINY, *data_flags, *flags, "--config.checkpoint.every=3", f"--workdir={root / name}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
  return root


def test_two_processes_train_like_one(runs):
  assert_same_losses(runs / "two", runs / "one")
  summary = json.loads((runs / "two" / "summary.json").read_text())
  assert summary["devices"] == 8 and summary["mesh"]["fsdp"] == 8


def test_only_process_0_writes_the_run_files(runs):
  assert len(metrics(runs / "two")) == STEPS  # one writer: no line twice
  assert len(list((runs / "two").glob("events.out.tfevents.*"))) == 1


def test_resume_a_two_process_checkpoint_in_two_processes(runs, tmp_path, data_flags):
  """A run stopped after its step-3 checkpoint resumes to the uninterrupted run's losses."""
  workdir = tmp_path / "resumed"
  shutil.copytree(runs / "two", workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  (workdir / "summary.json").unlink()
  r = launch(
    *TINY,
    *data_flags,
    "--devices=4",
    "--processes=2",
    "--config.checkpoint.every=3",
    f"--workdir={workdir}",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((workdir / "summary.json").read_text())["resumed_from_step"] == 3
  assert_same_losses(workdir, runs / "one")


def wait_for_training(workdir, procs):
  """Returns once a step is logged (the processes are inside the training loop's collectives)."""
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text()):
    assert all(p.poll() is None for p in procs), "a process ended before training started"
    assert time.monotonic() < deadline, "no step logged"
    time.sleep(0.2)


def long_run(data_flags, workdir):
  return [
    *TINY,
    *data_flags,
    "--config.train.steps=100000",
    "--config.train.eval_every=100000",
    "--devices=1",
    f"--workdir={workdir}",
  ]


# Slow: the supervisor's fault path (17 s); two-process training and resume stay in the default run.
@pytest.mark.slow
def test_a_killed_child_ends_the_local_run(tmp_path, data_flags):
  log = open(tmp_path / "log", "w")
  parent = start(log, *long_run(data_flags, tmp_path / "run"), "--processes=2")
  try:
    wait_for_training(tmp_path / "run", [parent])
    children = psutil.Process(parent.pid).children()
    victim = next(c for c in children if "--process_id=1" in c.cmdline())
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    code = parent.wait(timeout=FAIL_WITHIN_S)
    print(f"local run ended {time.monotonic() - t0:.2f} s after the kill")
  finally:
    parent.kill()
  assert code == 1
  message = (tmp_path / "log").read_text().strip().splitlines()[-1]
  assert message.startswith("error: process 1 of 2") and "SIGKILL" in message, message
  assert not any(c.is_running() for c in children)


# Slow: the cluster's fault path (17 s); two-process training and resume stay in the default run.
@pytest.mark.slow
def test_a_killed_cluster_process_ends_the_others(tmp_path, data_flags):
  """No parent: process 0 notices the missing heartbeats of process 1 and aborts."""
  log = open(tmp_path / "log", "w")
  cluster = [
    f"--coordinator=127.0.0.1:{portpicker.pick_unused_port()}",
    "--num_processes=2",
    "--heartbeat_timeout=5",
  ]
  procs = [
    start(log, *long_run(data_flags, tmp_path / "run"), *cluster, f"--process_id={i}")
    for i in range(2)
  ]
  try:
    wait_for_training(tmp_path / "run", procs)
    procs[1].kill()
    t0 = time.monotonic()
    code = procs[0].wait(timeout=FAIL_WITHIN_S)
    print(f"survivor exited ({code}) {time.monotonic() - t0:.2f} s after the kill")
  finally:
    for p in procs:
      p.kill()
  assert code != 0


def test_processes_and_cluster_flags_contradict(tmp_path, data_flags):
  r = launch(*TINY, *data_flags, "--processes=2", "--process_id=0", f"--workdir={tmp_path}")
  assert_bad_input(r, "--processes=2", "--process_id", "cannot be combined")
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
  "flags,phrases",
  [
    (dict(processes=2, auto=True), ["--processes=2", "--distributed", "cannot be combined"]),
    (dict(coordinator="127.0.0.1:1234"), ["--num_processes", "--process_id"]),
    (dict(coordinator="127.0.0.1", num_processes=2, process_id=0), ["HOST:PORT"]),
    (dict(coordinator="127.0.0.1:99999", num_processes=2, process_id=0), ["HOST:PORT"]),
    (
      dict(coordinator="no-such-host.invalid:1234", num_processes=2, process_id=1),
      ["no-such-host.invalid", "cannot be resolved"],
    ),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), ["[0, 2)"]),
    (dict(processes=2, mode="eval"), ["--mode=eval", "one process"]),
  ],
)
def test_bad_cluster_flags(flags, phrases):
  args = dict(
    processes=1,
    coordinator=None,
    num_processes=None,
    process_id=None,
    auto=False,
    mode="train",
    timeouts=(20, 120, 30),
  )
  with pytest.raises(InputError) as e:
    distributed.check_flags(**{**args, **flags})
  for phrase in phrases:
    assert phrase in str(e.value), str(e.value)


def test_bad_input_in_the_children_exits_2(tmp_path):
  """The child that refuses its input exits 2 at once (not at jax's exit barrier, where the others
  failing after it would abort it), and the parent exits 2 naming it."""
  r = launch(
    *TINY,
    f"--config.data.source={tmp_path / 'nope.txt'}",
    "--processes=2",
    f"--workdir={tmp_path / 'run'}",
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert f"error: data source {tmp_path / 'nope.txt'} does not exist" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: process ")


def test_no_coordinator_is_a_clear_error(tmp_path, data_flags):
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  r = launch(
    *TINY,
    *data_flags,
    f"--coordinator={address}",
    "--num_processes=2",
    "--process_id=1",
    "--initialization_timeout=2",
    f"--workdir={tmp_path}",
  )
  assert_bad_input(r, address, "nothing listens")


def test_busy_coordinator_port_is_a_clear_error():
  with socket.socket() as busy:
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(InputError, match=f"cannot listen on port {port}"):
      distributed.initialize(distributed.Cluster(f"127.0.0.1:{port}", 2, 0, 5, 5, 5))
