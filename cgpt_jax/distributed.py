"""Several processes, on one machine or one per host, joined into one set of devices.

launch.py runs in one of three ways:
- one process (the default);
- `--processes P` on one machine: this process starts P copies of launch.py joined over 127.0.0.1
  and supervises them; it runs no jax itself. If one child fails, the others are stopped and the
  run exits non-zero naming the child that failed. SIGTERM or SIGINT to it is passed on to the
  children as SIGTERM: they save a checkpoint after the same step and it exits 143 or 130;
- one process per host, started by a scheduler: `--coordinator HOST:PORT --num_processes P
  --process_id I`, or `--distributed` to take them from the scheduler's environment (SLURM, Open
  MPI, TPU pods; what `jax.distributed.initialize()` detects). With no parent to watch them,
  processes rely on the distributed service's heartbeats: when one dies the others abort within
  about `--heartbeat_timeout` seconds.

Every process reads its own rows of each batch (`process_rows`) and takes part in every collective
(compiles, steps, checkpoint saves and restores); process 0 alone writes the run's files.
"""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple, NoReturn

import jax
import numpy as np
import portpicker
from jax.experimental import multihost_utils

from cgpt_jax.errors import InputError

GRACE_S = 2.0  # how long the local parent lets children end on their own after one fails


class Cluster(NamedTuple):
  """How this process joins the others; None fields are detected from the scheduler."""

  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  heartbeat_timeout: int
  initialization_timeout: int
  shutdown_timeout: int


# ----------------------------------------------------------------------------------------------
# Flags (checked before anything starts)
# ----------------------------------------------------------------------------------------------
def check_flags(
  *,
  processes: int,
  coordinator: str | None,
  num_processes: int | None,
  process_id: int | None,
  auto: bool,
  mode: str,
  timeouts: tuple[int, int, int],
) -> Cluster | None:
  """The cluster this process joins (None: it runs alone or is a --processes parent)."""
  joins = {
    "--coordinator": coordinator,
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  given = [name for name, value in joins.items() if value is not None] + (
    ["--distributed"] if auto else []
  )
  if processes > 1 and given:
    raise InputError(
      f"--processes={processes} starts its own processes on this machine, so it cannot "
      f"be combined with {', '.join(given)}, which join processes started elsewhere. "
      "Use --processes alone on one machine, or the cluster flags on each host."
    )
  if (processes > 1 or given) and mode != "train":
    raise InputError(f"--mode={mode} runs in one process; drop --processes and the cluster flags.")
  if not given:
    return None
  missing = [name for name, value in joins.items() if value is None]
  if missing and not auto:
    raise InputError(
      f"{', '.join(given)} also needs {', '.join(missing)}: a cluster process is "
      "started with --coordinator=HOST:PORT --num_processes=P --process_id=I, or "
      "with --distributed to take them from the scheduler (SLURM, Open MPI)."
    )
  if num_processes is not None and num_processes < 1:
    raise InputError(f"--num_processes={num_processes}: must be at least 1.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise InputError(
      f"--process_id={process_id}: must be in [0, {num_processes}) for "
      f"--num_processes={num_processes}."
    )
  if coordinator is not None:
    resolve(coordinator)
  return Cluster(coordinator, num_processes, process_id, *timeouts)


def resolve(address: str) -> tuple[str, int]:
  """HOST:PORT (or [IPv6]:PORT) -> (host, port), refusing a malformed or unknown one."""
  host, sep, port = address.rpartition(":")
  host = host.removeprefix("[").removesuffix("]")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise InputError(
      f"--coordinator={address}: expected HOST:PORT with a port in 1..65535, e.g. "
      "--coordinator=10.0.0.1:1234 (the address of process 0)."
    )
  try:
    socket.getaddrinfo(host, int(port))
  except socket.gaierror as e:
    raise InputError(
      f"--coordinator={address}: host {host!r} cannot be resolved ({e.strerror}). "
      "Give process 0's host name or IP address."
    ) from None
  return host, int(port)


# ----------------------------------------------------------------------------------------------
# Joining (one process of a cluster)
# ----------------------------------------------------------------------------------------------
def initialize(cluster: Cluster) -> None:
  """Joins the cluster; before anything touches a jax device.

  Failures inside jax.distributed.initialize abort the process from C++ with a stack trace, so the
  causes a user can fix are checked here first: process 0's port must be free, and the others wait
  (up to the initialization timeout) for something to listen at the coordinator's address.
  """
  if cluster.coordinator is not None:
    host, port = resolve(cluster.coordinator)
    if cluster.process_id == 0:
      _check_port_free(cluster.coordinator, port)
    elif cluster.process_id is not None:
      _wait_for_coordinator(cluster.coordinator, host, port, cluster.initialization_timeout)
  # Cross-process collectives on CPU need gloo (the default, none, has only in-process ones).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      cluster.coordinator,
      cluster.num_processes,
      cluster.process_id,
      initialization_timeout=cluster.initialization_timeout,
      heartbeat_timeout_seconds=cluster.heartbeat_timeout,
      shutdown_timeout_seconds=cluster.shutdown_timeout,
    )
  except ValueError as e:  # --distributed where no scheduler jax knows describes the cluster
    raise InputError(
      f"--distributed: {e} No SLURM, Open MPI or TPU environment describes this "
      "cluster; give --coordinator, --num_processes and --process_id."
    ) from None


def _check_port_free(address: str, port: int) -> None:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("", port))
    except OSError as e:
      raise InputError(
        f"--coordinator={address}: process 0 cannot listen on port {port} "
        f"({e.strerror}). Choose a free port."
      ) from None


def _wait_for_coordinator(address: str, host: str, port: int, timeout_s: int) -> None:
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, port), timeout=2).close()
      return
    except OSError:
      if time.monotonic() > deadline:
        raise InputError(
          f"--coordinator={address}: nothing listens there after {timeout_s} s "
          "(--initialization_timeout). Start process 0 on that host with the same "
          "--coordinator, or fix the address."
        ) from None
      time.sleep(0.5)


# ----------------------------------------------------------------------------------------------
# --processes P: start and supervise P local children
# ----------------------------------------------------------------------------------------------
def run_local(processes: int, argv: list[str]) -> int:
  """Runs launch.py `argv` as `processes` children joined over 127.0.0.1; their exit code.

  A child repeats the parent's flags and appends its own: absl keeps a repeated flag's last value,
  so `--processes=1` makes it a cluster process. Children inherit the environment (GLIBC_TUNABLES
  included) and stderr; only process 0's stdout is kept, so the final line is printed once.
  """
  coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
  children, received = [], []

  def forward(signum, frame):
    """SIGTERM to every child: jax.distributed takes it as a preemption notice, and they agree on
    a step after which all save and exit 143 (train.StopSignals)."""
    del frame
    received.append(signum)
    for child in children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)

  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
  try:
    for i in range(processes):
      command = [
        sys.executable,
        *argv,
        "--processes=1",
        f"--coordinator={coordinator}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ]
      children.append(
        subprocess.Popen(
          command, stdout=None if i == 0 else subprocess.DEVNULL, preexec_fn=_child_setup
        )
      )
    return supervise(children, received)
  finally:
    stop(children)


def supervise(children: list[subprocess.Popen], received: list[int]) -> int:
  """Waits for every child to succeed (0), or for the first to fail: its failure (see `_failed`).
  Children are reaped in the order they end, so the one named is the one that failed first, not a
  survivor that the distributed service aborted after it. After a signal was passed on (see
  run_local), children that stop for it (143, or killed by SIGTERM before they could save) are
  waited for, and the answer is 128 + that signal."""
  running = {child.pid: i for i, child in enumerate(children)}
  while running:
    pid, status = os.wait()
    i = running.pop(pid)
    children[i].returncode = os.waitstatus_to_exitcode(status)
    stopped = received and children[i].returncode in (128 + signal.SIGTERM, -signal.SIGTERM)
    if children[i].returncode and not stopped:
      return _failed(children, i)
  return 128 + received[0] if received else 0


def _failed(children: list[subprocess.Popen], first: int) -> int:
  """Stops the children after child `first` failed: 2 if any refused bad input, else 1; either
  way with a line naming the child. The others get GRACE_S to end on their own first: a
  child that exits 2 closes its connections on the way out, and a neighbour that fails on them can
  be reaped before it."""
  deadline = time.monotonic() + GRACE_S
  for child in children:
    try:
      child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  stop(children)
  refused = [i for i, child in enumerate(children) if child.returncode == 2]
  if refused:
    print(
      f"error: process {refused[0]} of {len(children)} refused its input (its error line is "
      "above); stopped the others.",
      file=sys.stderr,
    )
    return 2
  code, pid = children[first].returncode, children[first].pid
  how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
  print(
    f"error: process {first} of {len(children)} (pid {pid}) {how}; stopped the others.",
    file=sys.stderr,
  )
  return 1


def stop(children: list[subprocess.Popen]) -> None:
  """Kills every running child and reaps them all. SIGKILL rather than SIGTERM: jax.distributed
  takes SIGTERM as a preemption notice and carries on, and a child of a failed run has nothing to
  save (orbax renames a checkpoint into place only when it is complete)."""
  for child in children:
    if child.poll() is None:
      child.kill()
  for child in children:
    child.wait()


def _child_setup() -> None:
  """In the child before exec: the kernel SIGKILLs it if the parent dies (even by SIGKILL), and it
  leaves the terminal's process group, so that a Ctrl-C reaches the parent alone, which passes it
  on to every child at once."""
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
  os.setpgrp()


# ----------------------------------------------------------------------------------------------
# Inside a run
# ----------------------------------------------------------------------------------------------
def exit_process(code: int) -> NoReturn:
  """sys.exit(code), except that a joined process which fails leaves at once: at jax.distributed's
  exit barrier the others, failing because it goes, would abort it and its code would be lost."""
  if code and jax.distributed.is_initialized():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def is_main() -> bool:
  """Process 0 writes the run's files; the others compute alongside it."""
  return jax.process_index() == 0


@contextlib.contextmanager
def main_first(name: str):
  """Process 0 runs the block before the others: it fills a cache (a dataset build) that they then
  read instead of all writing it at once."""
  if not is_main():
    barrier(name)
  yield
  if is_main():
    barrier(name)


def barrier(name: str) -> None:
  """All processes reach this point before any goes on (nothing to wait for alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
  """(index, count) such that this process's devices hold block `index` of `count` equal blocks of
  rows of a global array of `shape` laid out by `sharding`: what data.train_batches' process_index
  and process_count take. A batch split over every process gives (process, processes); one
  replicated across processes, (0, 1): each process reads all of it."""
  rows = sorted(
    {(s[0].indices(shape[0])[:2]) for s in sharding.addressable_devices_indices_map(shape).values()}
  )
  start, stop = rows[0][0], rows[-1][1]
  covered = np.zeros(shape[0], bool)
  for lo, hi in rows:
    covered[lo:hi] = True
  size = stop - start
  if not covered[start:stop].all() or start % size or shape[0] % size:
    raise InputError(
      f"process {jax.process_index()}'s devices hold rows {rows} of the batch of "
      f"{shape[0]}, not one block of equal blocks, so it cannot read its own rows. "
      "Choose axis sizes that split the batch over whole processes (data or fsdp a "
      "multiple of the process count)."
    )
  return start // size, shape[0] // size
