"""What a run records: metrics.jsonl and TensorBoard events (process 0 only), and the validation
loss it logs at every eval."""

import json
import math
import pathlib

import jax
import numpy as np

from cgpt_jax.errors import InputError


class Logger:
  """metrics.jsonl + TensorBoard events; one line per logged step. Resuming at step k keeps the
  lines up to k (those after it are logged again, identically) and purges later TensorBoard points.
  A last line cut short by a kill is dropped."""

  def __init__(self, workdir: pathlib.Path, start: int):
    from tensorboardX import (
      SummaryWriter,
    )  # imported here: it is slow to import and plan needs none

    path = workdir / "metrics.jsonl"
    self.records = read_metrics(path, start) if start else []
    path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
    self.jsonl = open(path, "a")
    self.tb = SummaryWriter(str(workdir), purge_step=start + 1 if start else None)

  def write(self, step: int, metrics: dict) -> None:
    try:
      self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
      self.jsonl.flush()
    except OSError as e:  # a full disk: the checkpoints written so far are whole
      raise InputError(
        f"cannot write {self.jsonl.name} at step {step} ({e.strerror}). Free space, "
        "then rerun the same command to resume from the last checkpoint."
      ) from None
    for key, value in metrics.items():
      self.tb.add_scalar(key, value, step)

  def close(self) -> None:
    self.jsonl.close()
    self.tb.close()


class NoLogger:
  """What processes other than 0 log: nothing (process 0 writes the run's files)."""

  records = []

  def write(self, step: int, metrics: dict) -> None:
    pass

  def close(self) -> None:
    pass


def read_metrics(path: pathlib.Path, upto: int) -> list[dict]:
  """metrics.jsonl's records up to step `upto`. Only the last line may be damaged (a write cut
  short by a kill): it is dropped; a damaged line before it is an InputError."""
  lines = path.read_text().splitlines() if path.exists() else []
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise InputError(
          f"{path}: line {i + 1} is not JSON, and it is not the last line (which a "
          "kill can cut short). Repair or delete that line, or use a new "
          "--workdir."
        ) from None
  return [r for r in records if r["step"] <= upto]


def perplexity(loss: float) -> float:
  return math.exp(loss) if loss < math.log(np.finfo(np.float64).max) else math.inf


def validation_loss(eval_step, params, batches, sharding) -> dict:
  # Every process holds every eval batch whole: the global shape tells jax to take each device's
  # rows from it.
  losses = [
    eval_step(params, jax.make_array_from_process_local_data(sharding, b, b.shape)) for b in batches
  ]
  loss = float(np.mean(jax.device_get(losses)))
  return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def logged_finish(out: pathlib.Path, logged: list[dict], steps: int) -> tuple[dict, float]:
  """(last train metrics, training time) of a run whose final checkpoint was saved but whose
  summary was not, from its metrics.jsonl."""
  final = [r for r in logged if r["step"] == steps]
  if not final:
    raise InputError(
      f"{out / 'metrics.jsonl'} has no record of the final step {steps}, so the run "
      "cannot be summarised. Delete the last checkpoint directory "
      f"({out / 'checkpoints' / str(steps)}) to redo the last steps."
    )
  steps_between = np.diff([0] + [r["step"] for r in logged])
  return final[0], float(sum(r["step_s"] * n for r, n in zip(logged, steps_between)))
