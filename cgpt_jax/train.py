"""One training run (or one plan) from a config.

config -> data -> validated config -> layout -> abstract state and its shardings -> sharded init ->
one AOT-compiled train step -> loop with logging and periodic eval -> summary.json.
Everything that can reject bad input runs before the first compile.
"""

import functools
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from cgpt_jax import checkpoint, data, distributed, hf, optim
from cgpt_jax import config as config_lib
from cgpt_jax import model as model_lib
from cgpt_jax.costs import analysis, comm
from cgpt_jax.errors import Diverged, InputError, Stopped
from cgpt_jax.parallel import context, layouts, pipeline, pipeline_1f1b, spmd, wafer


class TrainState(NamedTuple):
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


# ----------------------------------------------------------------------------------------------
# Input checks (all before anything compiles)
# ----------------------------------------------------------------------------------------------
RUN_MARKER = ".cgpt_run"  # written into every workdir this project creates


def is_run_dir(path: pathlib.Path) -> bool:
  """A workdir of this project: its marker, or (runs from before the marker) its own files."""
  return any((path / name).exists() for name in (RUN_MARKER, "checkpoints", "metrics.jsonl"))


def check_workdir(workdir: str, markers=()) -> pathlib.Path:
  """Refuses a workdir this run may not write into: a file, an unwritable place, a folder of files
  that are not a run of this project (an exported model, a dataset), or one holding `markers`.
  Creates nothing: create_workdir does, once every input is checked."""
  if not workdir:
    raise InputError("--workdir is empty. Give the run's folder, e.g. --workdir=runs/shakespeare.")
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise InputError(f"--workdir {path} exists and is not a directory. Choose another path.")
  if path.is_dir() and not is_run_dir(path):
    others = sorted(p.name for p in path.iterdir())
    if others:
      raise InputError(
        f"--workdir {path} holds files that no run of this project wrote "
        f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); refusing to "
        "write into it. Choose a new or empty --workdir."
      )
  found = [m for m in markers if (path / m).exists()]
  if found:
    raise InputError(
      f"--workdir {path} already holds a run ({', '.join(found)} exist); refusing to "
      "overwrite it. Choose a new --workdir or delete the old one."
    )
  ancestor = next(p for p in (path, *path.absolute().parents) if p.exists())
  if not (ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)):
    raise InputError(
      f"--workdir {path} is not writable ({ancestor} is "
      f"{'read-only' if ancestor.is_dir() else 'a file'}). "
      "Choose a directory you can write to."
    )
  return path


def create_workdir(path: pathlib.Path) -> None:
  """The workdir and its marker, once every input has been checked (a refused run leaves none)."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).touch()
  except OSError as e:
    raise InputError(
      f"--workdir {path} cannot be created ({e.strerror}). Choose a directory you can write to."
    ) from None


def check_resumable(out: pathlib.Path) -> None:
  """A workdir may hold an unfinished run only if it has a checkpoint to continue from."""
  if (out / "summary.json").exists():
    raise InputError(
      f"--workdir {out} already holds a run (summary.json: it finished); refusing to "
      "overwrite it. Choose a new --workdir, or raise --config.train.steps and delete "
      "summary.json to train it further."
    )


def data_dir(cfg: ml_collections.ConfigDict) -> str:
  return (
    cfg.data.data_dir
    or os.environ.get("CGPT_DATA_DIR")
    or os.path.expanduser("~/.cache/cgpt_jax/tfds")
  )


def load_data(cfg: ml_collections.ConfigDict) -> data.Corpus:
  return data.load_corpus(
    cfg.data.source,
    data_dir(cfg),
    cfg.data.tokenizer,
    cfg.data.tokenizer_path,
    allow_binary=cfg.data.allow_binary,
  )


def check_batches(cfg: ml_collections.ConfigDict, layout: layouts.Layout) -> None:
  n = layout.batch_size_divisor
  k = cfg.train.grad_accum
  for key, ways in (("global_batch", n * k), ("eval_batch", n)):
    if cfg.data[key] % ways:
      split = (
        f"{k} micro-steps x {n} devices" if key == "global_batch" and k > 1 else f"{n} devices"
      )
      raise InputError(
        f"config data.{key}={cfg.data[key]}: not divisible by the {split} of the batch axes "
        f"({layout.name}: {layout.axis_sizes}). Use a multiple of {ways}, e.g. "
        f"--config.data.{key}={max(ways, cfg.data[key] // ways * ways)}."
      )


# ----------------------------------------------------------------------------------------------
# State, shardings and the step functions
# ----------------------------------------------------------------------------------------------
def state_shardings(layout, abstract_params, tx, factor_min_dim: int = 0):
  """Shardings of TrainState, and of the per-parameter optimizer state (where each gradient is
  needed), from the parameters' logical names and the layout's rules."""
  logical = nnx.get_partition_spec(abstract_params)

  def by(rule):
    return jax.tree.map(lambda spec: rule(tuple(spec)), logical, is_leaf=layouts.is_spec)

  params, state = by(layout.sharding), by(layout.state_sharding)
  opt = opt_state_shardings(
    layout, jax.eval_shape(tx.init, abstract_params), abstract_params, logical, factor_min_dim
  )
  return TrainState(layout.replicated, params, opt), state


def opt_state_shardings(layout, abstract_opt, abstract_params, logical, factor_min_dim: int):
  """Every parameter-shaped tree in the optimizer state (Adam's moments, Adafactor's unfactored
  moments) shards like the parameters' state. Adafactor's factored moments are a parameter with one
  axis reduced away (`v_row` the largest, `v_col` the second largest): they keep the names of the
  axes that remain, so a row vector over `embed` stays split wherever `embed` is. Counters and
  placeholders are replicated."""
  param_tree = jax.tree.structure(abstract_params)

  def is_param_tree(x):
    return jax.tree.structure(x) == param_tree

  def leaf(reduced, x, p, spec):
    names = tuple(spec)
    if x.shape != p.shape:
      dims = optim.factored_dims(p.shape, factor_min_dim)
      if dims is None or reduced is None:
        return layout.replicated  # a (1,) placeholder for the moment this parameter does not use
      names = names[: dims[reduced]] + names[dims[reduced] + 1 :]
    return layout.state_sharding(names)

  def assign(path, sub):
    if not is_param_tree(sub):
      return layout.replicated
    field = getattr(path[-1], "name", None) if path else None
    reduced = {"v_row": 1, "v_col": 0}.get(field)  # index into factored_dims' (col, row) axes
    return jax.tree.map(lambda x, p, spec: leaf(reduced, x, p, spec), sub, abstract_params, logical)

  return jax.tree_util.tree_map_with_path(assign, abstract_opt, is_leaf=is_param_tree)


class Setup(NamedTuple):
  cfg: ml_collections.ConfigDict
  layout: layouts.Layout
  graphdef: Any
  abstract_params: nnx.State
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  shardings: TrainState
  grad_shardings: nnx.State
  batch_sharding: jax.sharding.NamedSharding
  n_params: int
  schedule: pipeline.Schedule | None  # None unless mesh.pipe > 1


def _initial_state(s: Setup, params) -> TrainState:
  if s.schedule:
    params = pipeline.to_stages(params, s.schedule)
  return TrainState(jnp.zeros((), jnp.int32), params, s.tx.init(params))


def make_init(s: Setup):
  """The initial state from train.seed, created in place on its shardings."""

  def init():
    return _initial_state(s, nnx.state(model_lib.GPT(s.cfg.model, rngs=nnx.Rngs(s.cfg.train.seed))))

  return jax.jit(init, out_shardings=s.shardings)


def make_init_from(s: Setup):
  """Initial state from given parameters (layer order): fine-tuning from imported weights."""
  return jax.jit(lambda params: _initial_state(s, params), out_shardings=s.shardings)


class StepSpecs(NamedTuple):
  """The manual parts (spmd.MANUAL) of the specs the step's shard_map works with."""

  params: Any  # where each parameter is held
  tensor: Any  # ... and over the tensor axis, which the shard_map leaves to the partitioner
  states: Any  # where each parameter's optimizer state is held: its gradient's destination
  dtypes: Any  # the dtype the forward uses each parameter in
  batch: P  # the token batch's rows


def step_specs(s: Setup) -> StepSpecs:
  logical = nnx.get_partition_spec(s.abstract_params)

  def by(rules, part=spmd.manual_part):
    return jax.tree.map(
      lambda names: part(s.layout.spec(tuple(names), rules)), logical, is_leaf=layouts.is_spec
    )

  dtypes = jax.tree_util.tree_map_with_path(
    lambda path, _: model_lib.compute_dtype(path, s.cfg.model.dtype), s.abstract_params
  )
  return StepSpecs(
    by(s.layout.rules),
    by(s.layout.rules, spmd.tensor_part),
    by(s.layout.state_rules),
    dtypes,
    spmd.manual_part(s.layout.spec(("batch", None))),
  )


def make_load(s: Setup):
  """load(blocks, stacked) -> block weights as the forward uses them, and load_all(params) -> every
  parameter so: gathered where a manual axis splits it (fsdp), in its compute dtype."""
  specs = step_specs(s)
  lead = 3 if s.schedule else 1  # [R, S, K, ...] or [L, ...] ahead of a layer's own dimensions

  def load(blocks, stacked: int = 0):
    """Block weights: one layer's, or with `stacked` leading dimensions of layers (none of them
    gathered)."""
    whole = (None,) * stacked
    return jax.tree.map(
      lambda x, spec, tensor, dtype: spmd.materialise(
        x, P(*whole, *spec[lead:]), P(*whole, *tensor[lead:]), dtype
      ),
      blocks,
      specs.params["blocks"],
      specs.tensor["blocks"],
      specs.dtypes["blocks"],
    )

  def load_all(params, blocks_too: bool = False):
    """The embedding, positions and final norm gathered once, and with `blocks_too` a pipeline
    stage's stacked blocks (else left as they are, for run_blocks to load)."""
    params = nnx.State(dict(params))
    for key in params:
      if key != "blocks":
        params[key] = jax.tree.map(
          spmd.materialise, params[key], specs.params[key], specs.tensor[key], specs.dtypes[key]
        )
      elif blocks_too:
        params[key] = load(params[key], 3)
    return params

  return load, load_all


def make_local_loss(s: Setup, bubble_fill: float = 0.0, per_token: bool = False):
  """loss(params, rows) of one device inside the step's shard_map: its shards of the parameters,
  its rows [b, T+1] of the batch -> the mean next-token loss over its tokens (or each token's,
  [b, T/S]). Under a pipeline each of the S stages takes 1/S of the sequence for the embedding,
  head and loss (per-token work, shared evenly rather than left to the first and last stage)."""
  cfg, graphdef, layout = s.cfg.model, s.graphdef, s.layout
  stages = layout.axis_sizes["pipe"]
  streams = any(
    spmd.is_split(p)
    for p in jax.tree.leaves(step_specs(s).params["blocks"], is_leaf=layouts.is_spec)
  )
  load, load_all = make_load(s)
  if s.schedule:  # the forward loop: the step's under gpipe and circular, every schedule's eval
    run_blocks = pipeline.make_run_blocks(cfg, s.schedule, load, bubble_fill)
  else:  # the wafer recomputes each layer in the backward (wafer.py)
    run_blocks = functools.partial(
      model_lib.scan_blocks,
      cfg,
      load=load,
      streams=streams,
      remat="full" if layout.streams_weights else None,
    )

  def local_loss(params, rows):
    with layout.active():
      params = load_all(params)
      inputs, targets, start = rows[:, :-1], rows[:, 1:], 0
      if stages > 1:
        part = inputs.shape[1] // stages
        start = jax.lax.axis_index(pipeline.AXIS) * part
        inputs, targets = (
          jax.lax.dynamic_slice_in_dim(a, start, part, axis=1) for a in (inputs, targets)
        )
      inputs, targets, start = context.local_part(inputs, targets, start)
      nll = nnx.merge(graphdef, params).token_nll(inputs, targets, run_blocks, start)
      return context.whole_sequence(nll) if per_token else jnp.mean(nll)

  return local_loss


def make_local_value_and_grad(s: Setup, weight: float, bubble_fill: float = 0.0):
  """(loss, gradients)(params, rows) of one device inside the step's shard_map, the loss (its
  mean over the device's tokens) times `weight`, gradients unreduced: autodiff of local_loss, or
  under the 1F1B family the schedule's own backward (pipeline_1f1b.py)."""
  if not (s.schedule and s.schedule.hand_written):
    local_loss = make_local_loss(s, bubble_fill)
    return jax.value_and_grad(lambda params, rows: local_loss(params, rows) * weight)
  _, load_all = make_load(s)
  value_and_grad = pipeline_1f1b.make_value_and_grad(
    s.cfg.model, s.schedule.program, s.graphdef, bubble_fill
  )
  # The last stage computes the loss of whole sequences, the other S - 1 stages none: S times the
  # weight of a device's share (1/S of the sequence) under the other schedules, over M microbatches.
  scale = weight * s.schedule.stages / s.schedule.microbatches

  def local_value_and_grad(params, rows):
    with s.layout.active():
      loaded, unload = jax.vjp(lambda p: load_all(p, blocks_too=True), params)
      loss, grads = value_and_grad(loaded, rows, scale)
      (grads,) = unload(grads)  # fsdp: reduce-scattered to the shards; cast back to float32
    return loss, grads

  return local_value_and_grad


def _shard_map(s: Setup, f, out_specs):
  # check_vma=False: exact GELU's erf polynomial fails jax 0.12's varying-axes check inside a
  # shard_map (a JAX bug; its error message suggests this workaround).
  specs = step_specs(s)
  return jax.shard_map(
    f,
    mesh=s.layout.mesh,
    axis_names=set(spmd.MANUAL),
    check_vma=False,
    in_specs=(specs.params, specs.batch),
    out_specs=out_specs,
  )


def make_loss(s: Setup, bubble_fill: float = 0.0, per_token: bool = False):
  """loss(params, batch [B, T+1]) on the whole mesh: the mean next-token loss, or with `per_token`
  each token's [B, T]."""
  local_loss = make_local_loss(s, bubble_fill, per_token)
  n = spmd.shares(s.layout.axis_sizes)
  axes = spmd.sized(s.layout.axis_sizes)

  def body(params, rows):
    loss = local_loss(params, rows)
    return loss if per_token else jax.lax.psum(loss / n, axes)

  batch = step_specs(s).batch
  return _shard_map(s, body, P(batch[0], pipeline.AXIS) if per_token else P())


def make_gradients(s: Setup, bubble_fill: float = 0.0):
  """(loss, gradients)(params, batch [B, T+1]): the gradients reduced once each, into the
  sharding of their optimizer state (spmd.py)."""
  specs = step_specs(s)
  sizes = s.layout.axis_sizes
  k = s.cfg.train.grad_accum
  # Each device's loss is over its 1/n of the step's tokens, and the micro-steps are k equal parts.
  value_and_grad = make_local_value_and_grad(s, 1 / (spmd.shares(sizes) * k), bubble_fill)

  def body(params, rows):
    if k == 1:
      loss, grads = value_and_grad(params, rows)
    else:
      # Micro-step i takes rows i, i+k, i+2k, ... of this device's rows; the gradients add up
      # locally, unreduced.
      b, t = rows.shape

      def accumulate(total, micro):
        # Tied to the micro-step, so that XLA cannot hoist a weight gather out of the loop and
        # hold every layer's whole weights for all k micro-steps (FSDP gathers per micro-step).
        weights, micro = jax.lax.optimization_barrier((params, micro))
        return jax.tree.map(jnp.add, total, value_and_grad(weights, micro)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, rows.reshape(b // k, k, t).swapaxes(0, 1))
    grads = jax.tree.map(
      lambda g, p, q: spmd.reduce_gradient(g, p, q, sizes), grads, specs.params, specs.states
    )
    return jax.lax.psum(loss, spmd.sized(sizes)), grads

  return _shard_map(s, body, (P(), specs.states))


def keep_finite(old: TrainState, new: TrainState, metrics: dict):
  """`new`, unless the step's loss, gradient norm or new parameters are not all finite: then the
  parameters and optimizer state stay `old`'s (the step count still advances, as the data does), so
  a non-finite state is never produced and so never saved. metrics["finite"] says which it was."""
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new.params)]))
  keep = lambda n, o: jnp.where(finite, n, o)
  state = TrainState(
    new.step,
    jax.tree.map(keep, new.params, old.params),
    jax.tree.map(keep, new.opt_state, old.opt_state),
  )
  return state, {**metrics, "finite": finite}


def make_train_step(s: Setup):
  # A fresh closure per layout: a jitted function reused across layouts keeps its old trace.
  gradients = make_gradients(s)
  tx, shardings = s.tx, s.shardings

  def train_step(state: TrainState, batch):
    loss, grads = gradients(state.params, batch)
    # The tensor axis's part of each gradient's placement (the shard_map leaves it automatic).
    grads = jax.lax.with_sharding_constraint(grads, s.grad_shardings)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": s.lr_schedule(state.step),
      }
      return keep_finite(state, TrainState(state.step + 1, params, opt_state), metrics)

  return jax.jit(
    train_step,
    in_shardings=(shardings, s.batch_sharding),
    out_shardings=(shardings, s.layout.replicated),
    donate_argnums=0,
  )


def make_eval_step(s: Setup):
  return jax.jit(
    make_loss(s),
    in_shardings=(s.shardings.params, s.batch_sharding),
    out_shardings=s.layout.replicated,
  )


def build(cfg: ml_collections.ConfigDict, vocab_size: int) -> Setup:
  """Validates the config against the tokenizer and devices, then derives everything from shapes."""
  cfg = config_lib.resolve(cfg, vocab_size)
  layout = layouts.make_layout(cfg.mesh)
  check_batches(cfg, layout)
  context.check(cfg, layout)
  schedule = pipeline.make_schedule(cfg, layout)
  graphdef, abstract_params = model_lib.abstract_model(cfg.model, cfg.train.seed)
  n_params = model_lib.count_params(abstract_params, cfg.model)
  if schedule:
    abstract_params = pipeline.to_stages(abstract_params, schedule)
  layouts.check_divisible(layout, abstract_params)
  lr_schedule = optim.schedule(cfg.optim, cfg.train.steps)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps, cfg.model.hidden_lr_multiplier)
  shardings, grad_shardings = state_shardings(
    layout, abstract_params, tx, cfg.optim.adafactor.factor_min_dim
  )
  batch_sharding = layout.sharding(("batch", None))
  return Setup(
    cfg,
    layout,
    graphdef,
    abstract_params,
    tx,
    lr_schedule,
    shardings,
    grad_shardings,
    batch_sharding,
    n_params,
    schedule,
  )


def compiled_costs(s: Setup, compiled) -> dict:
  """Matmul FLOPs and collective bytes per step measured in the compiled program, and per-device
  state bytes, each beside its analytic value."""
  hlo = compiled.as_text()
  m, d = s.cfg.model, s.cfg.data
  sizes = s.layout.axis_sizes
  vocab = model_lib.padded_vocab(m)
  tokens = d.global_batch * d.seq_len
  held = sum(x.size for x in jax.tree.leaves(s.abstract_params))
  streams = s.layout.streams_weights
  ways = sizes[context.AXIS]
  terms = comm.analytic_terms(
    s.layout, s.abstract_params, m, d.global_batch, d.seq_len, s.schedule, s.cfg.train.grad_accum
  )
  # The same step compiled for a GPU or TPU, which move the compute dtype (spmd.wire_dtype).
  accelerator_terms = comm.analytic_terms(
    s.layout,
    s.abstract_params,
    m,
    d.global_batch,
    d.seq_len,
    s.schedule,
    s.cfg.train.grad_accum,
    backend="gpu",
  )
  # A hand-written schedule's rounds are one conditional: which branch runs how often is the
  # schedule's table.
  shares = s.schedule.program.branch_shares() if s.schedule and s.schedule.hand_written else None
  by_dtype = analysis.collective_bytes_by_dtype(hlo, branch_shares=shares)
  opt_state = abstract_state(s).opt_state
  costs = {
    "optimizer_state_bytes": analysis.tree_bytes(opt_state),
    "optimizer_state_bytes_per_device": analysis.per_device_bytes(opt_state),
    "compiled_matmul_flops_per_step": analysis.dot_flops(hlo, shares) * s.layout.mesh.size,
    "expected_matmul_flops_per_step": analysis.expected_matmul_flops(
      m, d.seq_len, tokens, vocab, s.schedule, remat="full" if streams else None, context=ways
    ),
    "collective_bytes_per_step": {k: sum(v.values()) for k, v in by_dtype.items()},
    "collective_bytes_by_dtype": by_dtype,
    "analytic_collective_bytes_per_step": sum(terms.values()),
    "analytic_collective_bytes_by_kind": comm.by_kind(terms),
    "analytic_collective_terms": terms,
    "accelerator_collective_terms": accelerator_terms,
  }
  if s.cfg.optim.name == "adamw":  # REFERENCE.md §2's formula is for Adam's two moments
    costs["analytic_state_bytes_per_device"] = analysis.analytic_state_bytes(
      sizes, m, held, vocab, s.layout.name == "zero1"
    )
  if streams:
    loops = analysis.collective_bytes(hlo, loops_only=True)
    costs["wafer"] = {
      "mode": wafer.MODE,
      "streamed_bytes_per_step": loops.get("all-gather", 0) + loops.get("reduce-scatter", 0),
      "analytic_streamed_bytes_per_step": terms["layer_weight_gather"]
      + terms["layer_grad_scatter"],
    }
  if ways > 1:
    costs["context"] = context.describe(ways, d.seq_len)
  if s.schedule:
    # What the same step costs without the pipeline's bubbles: the single-device program.
    unpipelined = analysis.expected_matmul_flops(m, d.seq_len, tokens, vocab)
    costs["pipeline"] = {
      **s.schedule.describe(),
      "step_flops_ratio_theory": costs["expected_matmul_flops_per_step"] / unpipelined,
      "step_flops_ratio_measured": costs["compiled_matmul_flops_per_step"] / unpipelined,
    }
  return costs


def describe(s: Setup) -> dict:
  m = s.cfg.model
  return {
    "params": s.n_params,
    "layout": s.layout.name,
    "mesh": s.layout.axis_sizes,
    "devices": s.layout.mesh.size,
    "flops_per_token": analysis.flops_per_token(m, s.cfg.data.seq_len),
  }


def restore(s: Setup, ckpt: checkpoint.Checkpointer, step: int, resume: bool) -> TrainState:
  """The checkpoint at `step`, placed in this run's layout (whatever layout wrote it); one from
  another model or tokenizer (or, to `resume` training, another data order) is refused first."""
  ckpt.check(step, resume)
  like = abstract_state(s)
  split = jax.jit(
    lambda tree: checkpoint.from_layer_order(tree, s.schedule, like), out_shardings=s.shardings
  )
  return ckpt.restore(step, like, s.schedule, s.layout.mesh, split)


def abstract_state(s: Setup) -> TrainState:
  shapes = jax.eval_shape(make_init(s))
  return jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, s.shardings
  )


# ----------------------------------------------------------------------------------------------
# Plan: everything from abstract shapes, nothing allocated
# ----------------------------------------------------------------------------------------------
def plan(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  out = check_workdir(workdir, ("plan.json",))
  if cfg.model.vocab_size is not None:
    vocab = cfg.model.vocab_size
  elif cfg.data.tokenizer == "char":  # the vocabulary is the corpus's characters
    vocab = load_data(cfg).tokenizer.vocab_size
  else:
    vocab = data.make_tokenizer(cfg.data.tokenizer, path=cfg.data.tokenizer_path).vocab_size
  s = build(cfg, vocab)
  state = abstract_state(s)
  batch = jax.ShapeDtypeStruct(
    (s.cfg.data.global_batch, s.cfg.data.seq_len + 1), jnp.int32, sharding=s.batch_sharding
  )
  t0 = time.perf_counter()
  compiled = make_train_step(s).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  memory = analysis.compiled_memory(compiled)
  tokens_per_step = s.cfg.data.global_batch * s.cfg.data.seq_len
  budget = config_lib.TOKENS_PER_PARAM * s.n_params
  result = {
    **describe(s),
    "chinchilla_tokens": budget,
    "chinchilla_steps": math.ceil(budget / tokens_per_step),
    "tokens_per_step": tokens_per_step,
    "param_bytes": analysis.tree_bytes(state.params),
    "model_flops_per_step": analysis.flops_per_token(s.cfg.model, s.cfg.data.seq_len)
    * tokens_per_step,
    "compile_s": round(compile_s, 3),
    "memory_per_device_bytes": memory,
    "fits_80GB": memory["total_bytes"] <= 80e9,
    **compiled_costs(s, compiled),
    **({"cs2_streaming": wafer.cs2_streaming_table()} if s.layout.streams_weights else {}),
    "config": s.cfg.to_dict(),
  }
  create_workdir(out)
  (out / "plan.json").write_text(json.dumps(result, indent=2))
  if s.schedule:
    s.schedule.plot(out / "pipeline_timeline.png")
  return result


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
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


def evaluate(eval_step, params, batches, sharding) -> dict:
  # Every process holds every eval batch whole: the global shape tells jax to take each device's
  # rows from it.
  losses = [
    eval_step(params, jax.make_array_from_process_local_data(sharding, b, b.shape)) for b in batches
  ]
  loss = float(np.mean(jax.device_get(losses)))
  return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


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


def prepare_run(cfg: ml_collections.ConfigDict, workdir: str):
  """Every input checked, nothing written: (Setup, workdir, corpus, checkpointer or None, start
  step, starting state or None)."""
  out = check_workdir(workdir)
  check_resumable(out)
  if cfg.init.from_hf:  # the imported checkpoint defines the model's shape
    cfg.model.update(hf.read_config(cfg.init.from_hf))
  with distributed.main_first("data prepared"):
    corpus = load_data(cfg)
  s = build(cfg, corpus.tokenizer.vocab_size)
  cfg = s.cfg
  tokenizer = data.tokenizer_identity(corpus.tokenizer)
  ckpt, start, state = None, 0, None
  if cfg.checkpoint.every and (out / "checkpoints").is_dir():  # else created once all is checked
    ckpt = checkpoint.Checkpointer(out / "checkpoints", cfg, tokenizer)
    start = ckpt.latest_step() or 0
  if not start and (out / "metrics.jsonl").exists():
    raise InputError(
      f"--workdir {out} already holds a run with no complete checkpoint to resume "
      "from; refusing to overwrite it. Choose a new --workdir or delete the old one."
    )
  if start > cfg.train.steps:
    raise InputError(
      f"--workdir {out} has a checkpoint at step {start}, past "
      f"train.steps={cfg.train.steps}. Raise --config.train.steps to train further."
    )
  # The starting state is read now, so that a damaged or mismatched checkpoint (or imported folder)
  # is refused before anything is written.
  if start:
    state = restore(s, ckpt, start, resume=True)
  elif cfg.init.from_hf:
    state = make_init_from(s)(hf.import_params(cfg.init.from_hf, cfg.model, tokenizer))
  return s, out, corpus, tokenizer, ckpt, start, state


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir` -> summary.json. Raises InputError for bad input
  (nothing written), Diverged for a non-finite step and Stopped for SIGTERM/SIGINT (each after
  saving the last finite state)."""
  # ---- inputs ---------------------------------------------------------------------------------
  t0 = time.perf_counter()
  s, out, corpus, tokenizer, ckpt, start, state = prepare_run(cfg, workdir)
  init_s = time.perf_counter() - t0
  cfg, d = s.cfg, s.cfg.data
  # A run killed after its last checkpoint but before its summary is finished, not retrained.
  finishing = start == cfg.train.steps
  eval_batches = data.eval_batches(
    corpus.tokens["validation"],
    seq_len=d.seq_len,
    batch=d.eval_batch,
    max_batches=d.eval_batches or None,
  )
  batch_shape = (d.global_batch, d.seq_len + 1)
  block, blocks = distributed.process_rows(s.batch_sharding, batch_shape)
  batches = data.train_batches(
    corpus.tokens["train"],
    seq_len=d.seq_len,
    global_batch=d.global_batch,
    seed=d.seed,
    start_step=start,
    process_index=block,
    process_count=blocks,
  )
  # Every process has checked the workdir before process 0 writes to it.
  distributed.barrier("inputs checked")
  main = distributed.is_main()
  if main:
    create_workdir(out)
    if not finishing:
      name = f"config.resumed_at_{start}.json" if start else "config.json"
      (out / name).write_text(json.dumps(cfg.to_dict(), indent=2))
  distributed.barrier("workdir created")
  if cfg.checkpoint.every and ckpt is None:
    ckpt = checkpoint.Checkpointer(out / "checkpoints", cfg, tokenizer)

  # ---- compile --------------------------------------------------------------------------------
  peak = analysis.measure_matmul_peak(dtype=jnp.dtype(cfg.model.dtype))  # in the compute dtype
  if state is None:
    t0 = time.perf_counter()
    state = make_init(s)()
    init_s = time.perf_counter() - t0
  batch_struct = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=s.batch_sharding)
  t0 = time.perf_counter()
  train_step = make_train_step(s).lower(state, batch_struct).compile()
  compile_s = time.perf_counter() - t0
  eval_step = make_eval_step(s)
  memory = analysis.compiled_memory(train_step)

  # ---- train ----------------------------------------------------------------------------------
  logger = Logger(out, start) if main else NoLogger()
  logged = logger.records
  nonfinite = NonFinite(cfg, logged[-1].get("skipped_steps", 0) if logged else 0)
  tokens_per_step = d.global_batch * d.seq_len
  flops_per_token = analysis.flops_per_token(cfg.model, d.seq_len)
  train_time, last_log, last_log_step, saved = 0.0, time.perf_counter(), start, start
  last, eval_metrics = {}, {}
  bar = tqdm.tqdm(
    initial=start,
    total=cfg.train.steps,
    disable=not (cfg.train.progress and main),
    mininterval=1.0,
    dynamic_ncols=True,
  )
  signals = StopSignals()
  run_start = time.perf_counter()
  try:
    for step in range(start + 1, cfg.train.steps + 1):
      batch = jax.make_array_from_process_local_data(s.batch_sharding, next(batches), batch_shape)
      state, metrics = train_step(state, batch)
      # Waits for the step: a refused step is known before anything is saved or logged.
      if not bool(metrics.pop("finite")):
        why = nonfinite.stops(step, metrics)
        if why:
          kept = save_last_finite(ckpt, s, state, step - 1, saved)
          raise Diverged(f"{why}. {kept} {nonfinite.advice()}")
      else:
        nonfinite.in_a_row = 0
      # Asynchronous: the state is copied to host before this returns, then written in the
      # background.
      if ckpt and ckpt.save(step, state, s.schedule, force=step == cfg.train.steps):
        saved = step
      bar.update()
      is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
      if step % cfg.train.log_every == 0 or is_eval:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        interval = now - last_log
        train_time += interval
        last["step_s"] = interval / (step - last_log_step)
        last["tokens_per_s"] = tokens_per_step * (step - last_log_step) / interval
        last["skipped_steps"] = nonfinite.skipped
        record = dict(last)
        if is_eval:
          eval_metrics = evaluate(eval_step, state.params, eval_batches, s.batch_sharding)
          record.update(eval_metrics)
        logger.write(step, record)
        bar.set_postfix(
          loss=f"{last['loss']:.4f}",
          **({"val": f"{eval_metrics['eval_loss']:.4f}"} if is_eval else {}),
        )
        last_log, last_log_step = time.perf_counter(), step
      signum = signals.received(step)
      if signum and step < cfg.train.steps:
        raise Stopped(stopped_message(ckpt, s, state, step, saved, signum, out), signum)
  finally:
    signals.close()
    bar.close()
    logger.close()
    if ckpt:
      ckpt.close()  # waits for the last save
  wall_s = time.perf_counter() - run_start

  # ---- summary --------------------------------------------------------------------------------
  trained = cfg.train.steps - start
  if finishing:  # the numbers of the run as it was logged
    eval_metrics = evaluate(eval_step, state.params, eval_batches, s.batch_sharding)
    if not main:
      return {}
    last, train_time = logged_finish(out, logged, cfg.train.steps)
    wall_s, trained = train_time, cfg.train.steps
  tokens_per_s = tokens_per_step * trained / train_time
  summary = {
    **describe(s),
    "steps": cfg.train.steps,
    "resumed_from_step": start,
    "tokens": tokens_per_step * cfg.train.steps,
    "final_loss": last["loss"],
    "final_eval_loss": eval_metrics["eval_loss"],
    "final_eval_perplexity": eval_metrics["eval_perplexity"],
    "skipped_steps": nonfinite.skipped,
    "tokens_per_s": tokens_per_s,
    "step_ms": 1000 * train_time / trained,
    "mfu": tokens_per_s * flops_per_token / peak,
    "matmul_peak_flops": peak,
    "compile_s": compile_s,
    "init_s": init_s,
    "train_wall_s": wall_s,
    "model_flops_per_step": flops_per_token * tokens_per_step,
    "memory_per_device_bytes": memory,
    **compiled_costs(s, train_step),
  }
  if main:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


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
