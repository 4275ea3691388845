"""Faults during training never destroy good state: a signal stops the run after a saved step, and
a non-finite step is skipped or stops the run with the last finite state saved."""

import math
import pathlib
import signal
import sys
import threading

import jax
import ml_collections
import tqdm
from jax.experimental import multihost_utils

from cgpt_jax.train.setup import Setup, TrainState


class StopSignals:
  """SIGTERM (what SLURM and Kubernetes send before a kill) and SIGINT (Ctrl-C) during training
  are noted and acted on after the current step; a second one acts at once (its default action).

  Joined processes must all stop after the same step (saving is collective): there jax.distributed
  takes SIGTERM as a preemption notice and agrees on that step (reached_preemption_sync_point), and
  a --processes parent turns its own SIGINT or SIGTERM into SIGTERM for its children."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self.joined = jax.process_count() > 1
    self.previous = {}
    if not self.joined and threading.current_thread() is threading.main_thread():
      self.previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}

  def _note(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signum, signal.SIG_DFL)

  def received(self, step: int) -> int | None:
    """The signal to stop for after `step` (every process calls this after every step)."""
    if self.joined:
      return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return self.signum

  def close(self) -> None:
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


class NonFinite:
  """What the loop does after a step that keep_finite refused (train.on_nonfinite)."""

  def __init__(self, cfg: ml_collections.ConfigDict, skipped_before: int):
    self.policy, self.max_skips, self.lr = cfg.train.on_nonfinite, cfg.train.max_skips, cfg.optim.lr
    self.skipped, self.in_a_row = skipped_before, 0

  def stops(self, step: int, metrics: dict) -> str | None:
    """None to go on, or why the run stops (after `step`, whose update was dropped)."""
    what = (
      f"loss {float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}"
      if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]))
      else "the update made the parameters non-finite"
    )
    self.skipped += 1
    self.in_a_row += 1
    if self.policy == "skip" and self.in_a_row <= self.max_skips:
      tqdm.tqdm.write(
        f"warning: step {step}: {what}; update skipped ({self.in_a_row} in a row, "
        f"train.max_skips={self.max_skips})",
        file=sys.stderr,
      )
      return None
    if self.policy == "skip":
      return (
        f"steps {step - self.in_a_row + 1}..{step} were all non-finite (last: {what}), more "
        f"than train.max_skips={self.max_skips} in a row"
      )
    return f"step {step}: non-finite ({what}), train.on_nonfinite=stop"

  def advice(self) -> str:
    return f"Lower --config.optim.lr (now {self.lr}) or raise warm-up" + (
      "."
      if self.policy == "skip"
      else ", or rerun with --config.train.on_nonfinite=skip to drop such updates."
    )


def save_last_finite(ckpt, s: Setup, state: TrainState, step: int, saved: int) -> str:
  """Saves `state` (keep_finite kept its parameters: those after `step`) as checkpoint `step`
  unless it is saved already; says where the last finite checkpoint is."""
  if ckpt and step > saved:
    ckpt.save(step, state._replace(step=state.step - 1), s.schedule, force=True)
    saved = step
  if not (ckpt and saved):
    return "No checkpoint was saved (none was due yet)."
  return (
    f"The last finite state is checkpoint {saved} in {ckpt.directory} (--mode=eval and "
    "--mode=generate read it)."
  )


def stopped_message(
  ckpt, s: Setup, state: TrainState, step: int, saved: int, signum: int, out: pathlib.Path
) -> str:
  name = signal.Signals(signum).name
  if not ckpt:
    return (
      f"stopped by {name} after step {step}; checkpoint.every=0, so nothing was saved to "
      "resume from."
    )
  if step > saved:
    ckpt.save(step, state, s.schedule, force=True)
  return (
    f"stopped by {name} after step {step}; saved checkpoint {step} in {ckpt.directory}. "
    f"Rerun the same command to resume (--workdir={out})."
  )
