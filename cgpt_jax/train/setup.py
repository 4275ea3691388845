"""Everything a run derives from its config before anything is allocated: the validated config,
the layout, the abstract parameters and state with their shardings, the optimizer; and the state
itself, created in place or restored from a checkpoint into this layout."""

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cgpt_jax import checkpoint, data, optim
from cgpt_jax import config as config_lib
from cgpt_jax import model as model_lib
from cgpt_jax.costs import analysis
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import context, layouts, pipeline


class TrainState(NamedTuple):
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


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


def load_tokenizer(cfg: ml_collections.ConfigDict) -> data.Tokenizer:
  """The run's tokenizer without its corpus where it can: a char vocabulary is the corpus's
  characters, so only that kind reads the data."""
  if cfg.data.tokenizer == "char":
    return load_data(cfg).tokenizer
  return data.make_tokenizer(cfg.data.tokenizer, path=cfg.data.tokenizer_path)


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


def state_shardings(
  layout: layouts.Layout,
  abstract_params: nnx.State,
  tx: optax.GradientTransformation,
  factor_min_dim: int = 0,
) -> tuple["TrainState", nnx.State]:
  """Shardings of TrainState, and of the per-parameter optimizer state (where each gradient is
  needed), from the parameters' logical names and the layout's rules."""
  logical = nnx.get_partition_spec(abstract_params)
  params = layout.tree_shardings(abstract_params)
  state = layout.tree_shardings(abstract_params, state=True)
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


def make_init(s: Setup) -> Callable[[], TrainState]:
  """The initial state from train.seed, created in place on its shardings."""

  def init():
    return _initial_state(s, nnx.state(model_lib.GPT(s.cfg.model, rngs=nnx.Rngs(s.cfg.train.seed))))

  return jax.jit(init, out_shardings=s.shardings)


def make_init_from(s: Setup) -> Callable[[nnx.State], TrainState]:
  """Initial state from given parameters (layer order): fine-tuning from imported weights."""
  return jax.jit(lambda params: _initial_state(s, params), out_shardings=s.shardings)


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
  lr_schedule = optim.lr_schedule(cfg.optim, cfg.train.steps)
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
