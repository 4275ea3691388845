"""The step functions: one device's loss and gradients inside the step's shard_map (spmd.py),
and the jitted train and eval steps over the whole mesh."""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from cgpt_jax import model as model_lib
from cgpt_jax.parallel import context, layouts, pipeline, pipeline_1f1b, spmd
from cgpt_jax.train.setup import Setup, TrainState


class StepSpecs(NamedTuple):
  """The manual parts (spmd.MANUAL) of the specs the step's shard_map works with."""

  params: Any  # where each parameter is held
  tensor: Any  # ... and over the tensor axis, which the shard_map leaves to the partitioner
  states: Any  # where each parameter's optimizer state is held: its gradient's destination
  dtypes: Any  # the dtype the forward uses each parameter in
  batch: P  # the token batch's rows


def step_specs(s: Setup) -> StepSpecs:
  def by(rules, part=spmd.manual_part):
    specs = s.layout.tree_specs(s.abstract_params, rules)
    return jax.tree.map(part, specs, is_leaf=layouts.is_spec)

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


def make_load(s: Setup) -> tuple[Callable, Callable]:
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


def make_local_loss(
  s: Setup, bubble_fill: float = 0.0, per_token: bool = False
) -> Callable[[nnx.State, jax.Array], jax.Array]:
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


def make_local_value_and_grad(
  s: Setup, weight: float, bubble_fill: float = 0.0
) -> Callable[[nnx.State, jax.Array], tuple[jax.Array, nnx.State]]:
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


def make_loss(
  s: Setup, bubble_fill: float = 0.0, per_token: bool = False
) -> Callable[[nnx.State, jax.Array], jax.Array]:
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


def make_gradients(
  s: Setup, bubble_fill: float = 0.0
) -> Callable[[nnx.State, jax.Array], tuple[jax.Array, nnx.State]]:
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


def keep_finite(old: TrainState, new: TrainState, metrics: dict) -> tuple[TrainState, dict]:
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


def make_train_step(s: Setup) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
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


def make_eval_step(s: Setup) -> Callable[[nnx.State, jax.Array], jax.Array]:
  return jax.jit(
    make_loss(s),
    in_shardings=(s.shardings.params, s.batch_sharding),
    out_shardings=s.layout.replicated,
  )
