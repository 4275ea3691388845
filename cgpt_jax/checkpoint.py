"""Checkpoints with orbax: asynchronous saves every N steps and at the end, the last K kept, and
restores into whatever layout the current run has.

A checkpoint holds the whole TrainState (parameters, optimizer state, step) and a JSON record of
what produced it: the model shape and the tokenizer (kind and a hash of its vocabulary; both checked
before anything is read), the data seed (checked on resume) and the step.
That is all a bit-exact resume needs: a training batch is a pure function of (seed, step)
(data/batches.py) and the step has no randomness (dropout 0), so the step number is the data
iterator's position and there is no RNG state to carry.

Layer parameters (and every optimizer moment shaped like them) are saved in layer order [L, ...]
whatever the layout: a pipeline's [R, S, K, ...] stage layout is a free reshape of it
(pipeline.to_stages), undone before saving and redone after restoring, so a checkpoint written
under one layout restores under any other, on any number of devices. orbax restores each array
straight into the target sharding of the current run.

orbax writes a step into a temporary directory and renames it when complete, so a save cut short
(a killed process) never shadows the previous complete one; a complete but unreadable checkpoint is
an InputError (exit 2) that names the step directory.
"""

import contextlib
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from cgpt_jax.errors import InputError
from cgpt_jax.parallel import pipeline

# What must match for a checkpoint's arrays to mean the same thing in this run.
MODEL_KEYS = (
  "n_layers",
  "d_model",
  "n_heads",
  "d_ff",
  "vocab_size",
  "vocab_multiple",
  "n_positions",
  "mup",
)
OPTIMIZER_KEYS = ("name",)


def to_layer_order(state, schedule):
  """[R, S, K, ...] -> [L, ...] for every stacked-layer array (the identity without a pipeline)."""
  if schedule is None:
    return state
  return jax.tree_util.tree_map_with_path(
    lambda p, x: (
      x.reshape(pipeline.layer_shape(x.shape)) if pipeline.is_staged(p, x, schedule) else x
    ),
    state,
  )


def from_layer_order(state, schedule, like):
  """Inverse of to_layer_order, shaped after `like` (the run's own abstract state)."""
  if schedule is None:
    return state
  return jax.tree_util.tree_map_with_path(
    lambda p, x, l: x.reshape(l.shape) if pipeline.is_staged(p, l, schedule) else x, state, like
  )


def layer_order_target(abstract_state, schedule, mesh):
  """The abstract state in layer order, with the shardings arrays are restored into: a layer array's
  own sharding less its repeat/stage/layer dims (pipeline layouts re-split it by stage after)."""
  if schedule is None:
    return abstract_state

  def target(path, x):
    if not pipeline.is_staged(path, x, schedule):
      return x
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec[3:]))
    return jax.ShapeDtypeStruct(pipeline.layer_shape(x.shape), x.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(target, abstract_state)


def describe_run(cfg, tokenizer: dict) -> dict:
  return {
    "model": {k: cfg.model[k] for k in MODEL_KEYS},
    "optimizer": {k: cfg.optim[k] for k in OPTIMIZER_KEYS},
    "tokenizer": tokenizer,
    "data_seed": cfg.data.seed,
  }


class Checkpointer:
  """CheckpointManager over WORKDIR/checkpoints for one run; `tokenizer` is
  data.tokenizer_identity() of the run's tokenizer."""

  def __init__(self, directory: pathlib.Path, cfg, tokenizer: dict, read_only: bool = False):
    self.directory = directory
    self.record = describe_run(cfg, tokenizer)
    self.manager = ocp.CheckpointManager(
      directory.resolve(),
      options=ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.checkpoint.every,
        max_to_keep=cfg.checkpoint.keep,
        enable_async_checkpointing=True,
        read_only=read_only,
        create=not read_only,
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, schedule, force: bool = False) -> bool:
    """Starts an asynchronous save when `step` is due (every N steps, or `force`); whether it did.
    A disk without room for it is an InputError before anything is written; a write that fails
    anyway is one here or at the next save or wait."""
    if not (force or self.manager.should_save(step)):
      return False
    self._check_room(step, state)
    with self._writing(step):
      return self.manager.save(
        step,
        force=force,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(to_layer_order(state, schedule)),
          run=ocp.args.JsonSave({**self.record, "step": step}),
        ),
      )

  def check(self, step: int, resume: bool = False) -> None:
    """Reads the record of the checkpoint at `step` and refuses one from another model or tokenizer,
    or to `resume` training, another data order (before the run writes anything)."""
    where = self.directory / str(step)
    try:
      record = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))[
        "run"
      ]
    except Exception as e:  # orbax raises many kinds for a damaged directory
      raise InputError(
        f"checkpoint {where} cannot be read ({type(e).__name__}: {e}). Delete that "
        "step directory to resume from an earlier one, or use a new --workdir."
      ) from None
    self.check_compatible(record, where, resume)

  def restore(self, step: int, abstract_state, schedule, mesh, restore_fn):
    """The checkpoint at `step` placed as `abstract_state` (the current run's shapes and shardings).
    `restore_fn(tree)` re-splits layer-order arrays into the run's layout (a jitted
    from_layer_order with the run's out_shardings)."""
    where = self.directory / str(step)
    target = layer_order_target(abstract_state, schedule, mesh)
    try:
      state = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )["state"]
    except Exception as e:
      raise InputError(
        f"checkpoint {where} cannot be restored ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Delete that step directory to "
        "resume from an earlier one, or use a new --workdir."
      ) from None
    return restore_fn(state) if schedule else state

  def check_compatible(self, record: dict, where: pathlib.Path, resume: bool = False) -> None:
    for section in ("model", "optimizer"):
      for key, ours in self.record[section].items():
        theirs = record.get(section, {}).get(key)
        if theirs != ours:
          field = "optim" if section == "optimizer" else "model"
          raise InputError(
            f"checkpoint {where} is for {field}.{key}={theirs!r}, this run has {field}.{key}="
            f"{ours!r}. Resume with the checkpoint's {section} settings, or use a new --workdir."
          )
    theirs = record.get("tokenizer")  # absent from checkpoints older than the record
    if theirs is not None and theirs != self.record["tokenizer"]:
      raise InputError(
        f"checkpoint {where} was trained with the tokenizer {describe_tokenizer(theirs)}, this "
        f"run's is {describe_tokenizer(self.record['tokenizer'])}: the same ids would mean other "
        "text. Use the data.source, data.tokenizer and data.tokenizer_path it was trained with."
      )
    if resume and record.get("data_seed") != self.record["data_seed"]:
      raise InputError(
        f"checkpoint {where} was trained with data.seed={record.get('data_seed')!r}, this run has "
        f"data.seed={self.record['data_seed']!r}: resuming would change the order of the batches "
        "it has not seen yet. Resume with the checkpoint's data.seed, or use a new --workdir."
      )

  def _check_room(self, step: int, state) -> None:
    """Refuses a save the disk has no room for (and one still being written), so that orbax never
    starts it: its failure mid-write is reported from several threads, a thousand lines long."""
    need = sum(x.nbytes for x in jax.tree.leaves(state)) * 1.05 + 2**20  # + metadata
    if self.manager.is_saving_in_progress():
      need *= 2
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise InputError(
        f"no room for checkpoint {step} in {self.directory}: it needs about {need / 2**20:.1f} "
        f"MiB, {free / 2**20:.1f} MiB are free. Checkpoints {self.manager.all_steps() or 'none'} "
        "are intact. Free space (or lower checkpoint.keep), then rerun the same command to "
        "resume."
      )

  @contextlib.contextmanager
  def _writing(self, step: int):
    """An OSError from orbax's writes (often raised from its background thread, many lines deep)
    as one line; the checkpoints completed before it stay intact (orbax renames a step into place
    only when it is whole)."""
    try:
      yield
    except Exception as e:  # orbax re-raises a background failure wrapped in its own types
      cause = _write_error(e)
      if cause is None:
        raise
      done = self.manager.all_steps()
      raise InputError(
        f"cannot write checkpoint {step} (or one before it) to {self.directory}: {cause}. "
        f"Checkpoints {done or 'none'} are intact. Free space (or fix the folder), then rerun the "
        "same command to resume."
      ) from None

  def wait(self) -> None:
    with self._writing(self.manager.latest_step()):
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def describe_tokenizer(identity: dict) -> str:
  kind, size, digest = identity.get("kind"), identity.get("vocab_size"), identity.get("sha256")
  return f"{kind!r} ({size} tokens, sha256 {digest})"


def _write_error(e: BaseException) -> str | None:
  """What failed to be written, if `e` or one of its causes is a failed write: an OSError, or
  tensorstore's RESOURCE_EXHAUSTED / PERMISSION_DENIED (raised as ValueError)."""
  while e is not None:
    if isinstance(e, OSError):
      return e.strerror or str(e)
    if isinstance(e, ValueError) and str(e).startswith(("RESOURCE_EXHAUSTED", "PERMISSION_DENIED")):
      return str(e).split(":")[0] + (
        " (no space left on device)" if "No space left" in str(e) else ""
      )
    e = e.__cause__ or e.__context__
  return None
