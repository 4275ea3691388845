"""The device mesh, layouts, and the logical->mesh axis rules.

One mesh with a fixed list of axes (`AXES`). A layout is data: the size of each axis (1 = off,
one -1 = "the rest of the devices") and a table mapping the model's logical axis names to mesh axes.
The model only ever names logical axes (`constrain(x, ("batch", "seq", "embed"))`); which devices
hold what is decided here and nowhere else.
"""

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cgpt_jax.errors import InputError
from cgpt_jax.parallel.spmd import axes_of

AXES = ("data", "pipe", "fsdp", "context", "tensor")
TENSOR = "tensor"
BATCH_AXES = ("data", "fsdp")  # FSDP is data parallelism whose state is sharded too

# Logical axis -> mesh axes. A logical name missing from a table is replicated.
Rules = Mapping[str, tuple[str, ...]]

# One table for every layout: which devices hold what follows from the axis sizes alone (an axis
# of size 1 drops out). Within one array a mesh axis is used once, by the first dimension that asks
# for it (see Layout.spec): a weight [embed, mlp] puts embed on fsdp and mlp on tensor, while an
# activation [batch, seq, mlp] has batch take data and fsdp and mlp take tensor.
RULES: Rules = {
  "batch": BATCH_AXES,
  "embed": ("fsdp",),  # ZeRO-3: weights split along d_model, gathered one layer at a time
  "heads": ("tensor",),  # Megatron: column-parallel QKV, row-parallel attention-out
  # Column-parallel MLP-in, row-parallel MLP-out. Not on fsdp: a dimension split over tensor
  # and fsdp both could not be gathered over fsdp alone inside the step's shard_map (spmd.py),
  # so under fsdp the MLP matrices split along embed and the MLP biases (d_ff each) stay whole.
  "mlp": ("tensor",),
  "vocab": ("tensor",),  # vocab-parallel embedding, logits and cross entropy
  "stage": ("pipe",),  # pipeline stages of the stacked layers (pipeline.py)
  # Outside the pipeline (embedding, head, loss) the `pipe` devices split the sequence: those parts
  # are per-token, so this is plain data parallelism for them. Inside the pipeline `pipe` is manual
  # and these entries drop out. `context` splits the sequence everywhere, attention included, each
  # device holding two zig-zag chunks (context.py). Both axes are manual in the step's shard_map,
  # which splits the sequence itself (train.make_local_loss).
  "seq": ("pipe", "context"),
  "residual_seq": ("pipe", "context"),
}


@dataclasses.dataclass(frozen=True)
class LayoutPreset:
  sizes: dict[str, int]  # axes not named are 1; the config may override any of them
  extra_rules: Rules = dataclasses.field(default_factory=dict)  # added to RULES
  state_rules: Rules = dataclasses.field(default_factory=dict)  # optimizer state, over RULES
  streams_weights: bool = False  # the blocks run as wafer.py's weight-streaming loop


LAYOUT_PRESETS: dict[str, LayoutPreset] = {
  # The reference: one device, nothing sharded.
  "single": LayoutPreset({}),
  # Batch split over every device; parameters and optimizer state replicated; the step all-reduces
  # the float32 gradients once: 2 P 4 (n-1)/n bytes per device per step
  # (docs/formulas.md#data-parallel).
  "dp": LayoutPreset({"data": -1}),
  # ZeRO-1: as dp, but each device keeps 1/n of the Adam moments (split along d_model, or d_ff for
  # the MLP biases; the tied table along its rows, so its slice is contiguous and its update reads
  # in order, where a column slice cost 0.8 s a step at the 111M widths on a CPU); the update runs
  # on that slice and the new parameters are all-gathered. Same bytes as dp (reduce-scatter +
  # all-gather), K Psi / n of optimizer memory.
  "zero1": LayoutPreset(
    {"data": -1}, state_rules={"vocab": ("data",), "embed": ("data",), "mlp": ("data",)}
  ),
  # ZeRO-3: parameters, gradients and moments split along d_model over fsdp; inside the layer scan
  # each layer's weights are all-gathered forward and again backward, its gradients
  # reduce-scattered: 3 P b (n-1)/n.
  "fsdp": LayoutPreset({"fsdp": -1}),
  # Megatron tensor parallelism: per layer 4 all-reduces of the [tokens, d_model] activation
  # forward + backward, 8 B T d b (Y-1)/Y, plus the vocab-parallel embedding and head.
  "tp": LayoutPreset({"tensor": -1}),
  # tp + sequence parallelism: the residual stream (layer norms, residual adds) is also split along
  # the sequence between the tensor-parallel regions, 1/Y of its activation memory. Megatron-SP
  # turns each all-reduce into an all-gather + reduce-scatter pair of the same bytes, written out
  # in tensor_region (the CPU partitioner would keep the all-reduces and add gathers).
  "sp": LayoutPreset({"tensor": -1}, extra_rules={"residual_seq": ("tensor",)}),
  # Pipeline: the stacked layers split into stages over pipe, microbatches handed on with ppermute
  # (pipeline.py). Per step each device sends one [microbatch, seq, d_model] activation per
  # iteration forward and one backward: 2 (M R + S - 1) mb T d b.
  "pp": LayoutPreset({"pipe": -1}),
  # Megatron's 3D combination: data x pipe x tensor (set mesh.fsdp > 1 for ZeRO-3 within it).
  "3d": LayoutPreset({"data": 2, "pipe": 2, "tensor": 2}),
  # Context parallelism (context.py): the sequence split over `context` in zig-zag chunks, the
  # chunks' keys and values passed round a ring for attention: per layer 2 (N-1)/N b T d forward
  # and again backward, and every device the same causal work.
  "cp": LayoutPreset({"context": -1}),
  # Cerebras weight streaming (wafer.py): all devices are one wafer holding the activations
  # (batch split over fsdp); each layer's weights stream in from their shards when it runs, in the
  # forward and again in the backward, and its gradients stream back out: 3 P b (n-1)/n.
  "wafer": LayoutPreset({"fsdp": -1}, streams_weights=True),
  # SwarmX: `data` wafers, each a wafer; gradients reduced across wafers, 2 (P/n) b (W-1)/W more.
  "swarm": LayoutPreset({"data": 2, "fsdp": -1}, streams_weights=True),
}


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  mesh: Mesh
  rules: Rules
  state_rules: Rules
  streams_weights: bool = False

  def spec(
    self,
    names: Sequence[str | None],
    rules: Rules | None = None,
    manual: frozenset[str] = frozenset(),
  ) -> P:
    """Logical axis names -> PartitionSpec over this mesh.

    Axes of size 1 are dropped, and a mesh axis already taken by an earlier dimension is skipped:
    that is how one table serves parameters and activations, e.g. under fsdp a weight's `embed`
    dimension is sharded over `fsdp` while an activation's batch dimension has taken it first.
    `manual` axes (those a shard_map has taken over) are dropped too.
    """
    rules = self.rules if rules is None else rules
    out, used = [], set(manual)
    for name in names:
      axes = tuple(a for a in rules.get(name, ()) if self.mesh.shape[a] > 1 and a not in used)
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)

  def sharding(self, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names))

  def state_sharding(self, names: Sequence[str | None]) -> NamedSharding:
    """Sharding of optimizer state that belongs to a parameter with these logical names."""
    return NamedSharding(self.mesh, self.spec(names, self.state_rules))

  def tree_specs(self, params: nnx.State, rules: Rules | None = None):
    """PartitionSpecs of every array in `params` (abstract or not), from its logical names."""
    logical = nnx.get_partition_spec(params)
    return jax.tree.map(lambda names: self.spec(tuple(names), rules), logical, is_leaf=is_spec)

  def tree_shardings(self, params: nnx.State, state: bool = False):
    """Where every array in `params` lives, or with `state` where its optimizer state does."""
    rules = self.state_rules if state else self.rules
    return jax.tree.map(
      lambda spec: NamedSharding(self.mesh, spec), self.tree_specs(params, rules), is_leaf=is_spec
    )

  @property
  def zero1(self) -> bool:
    """The optimizer state is split over devices that hold the parameters whole (ZeRO-1): some
    logical name's state goes to a mesh axis the parameter itself is not split over."""
    return any(
      self.spec((name,), self.state_rules) != self.spec((name,)) for name in self.state_rules
    )

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def sequence_parallel(self) -> bool:
    """The residual stream is split along the sequence over tensor (Megatron-SP)."""
    return TENSOR in self.rules.get("residual_seq", ()) and self.mesh.shape[TENSOR] > 1

  @property
  def vocab_split(self) -> bool:
    """The vocabulary (embedding rows, logits) is split over a mesh axis (vocab-parallel)."""
    return self.spec(("vocab",)) != P(None)

  @property
  def batch_size_divisor(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.rules.get("batch", ()))

  @property
  def axis_sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  @contextlib.contextmanager
  def active(self) -> Iterator[None]:
    """Makes `constrain` use this layout while a step function is traced."""
    token = _ACTIVE.set(self)
    try:
      yield
    finally:
      _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


def is_spec(x) -> bool:
  """Leaf predicate for trees of PartitionSpecs (nnx.get_partition_spec's output)."""
  return isinstance(x, P)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `Layout.active()` or on one device.

  Inside a shard_map (the pipeline's body) the constraint is over the context's abstract mesh and
  leaves out the axes the shard_map made manual: the remaining axes stay automatic.
  """
  layout = _ACTIVE.get()
  if layout is None or layout.mesh.size == 1:
    return x
  context = jax.sharding.get_abstract_mesh()
  if not context.empty and not context.auto_axes:
    return x  # wholly inside a shard_map: nothing left for the compiler to place
  if not context.empty and context.manual_axes:
    spec = layout.spec(names, manual=frozenset(context.manual_axes))
    return jax.lax.with_sharding_constraint(x, NamedSharding(context, spec))
  return jax.lax.with_sharding_constraint(x, layout.sharding(names))


def tensor_region(module: nnx.Module, x: jax.Array) -> jax.Array:
  """module(x) for a tensor-parallel region (attention or the MLP, whose `mix` is the part a
  device's heads or MLP columns compute, a partial sum of the whole, and `output_bias` the rest).

  Under tensor parallelism the partitioner all-reduces the partial sums (Megatron). Under sequence
  parallelism the residual stream x [batch, seq/Y, d] is split along the sequence: the region is
  entered with an all-gather of the sequence and left with a reduce-scatter back to sequence parts,
  written here in a shard_map over `tensor` because the CPU partitioner would keep the all-reduce
  and slice (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models"). The same bytes as tp's all-reduce, and 1/Y of its residual-stream activations.
  """
  layout = _ACTIVE.get()
  if layout is None or not layout.sequence_parallel:
    return module(x)
  graphdef, state = nnx.split(module)

  def tensor_spec(v):  # a stacked layer's slice still carries the leading `layers` names
    names = tuple(v.get_metadata()["out_sharding"])[-v.ndim :] if v.ndim else ()
    return P(*(TENSOR if TENSOR in axes_of(e) else None for e in layout.spec(names)))

  specs = jax.tree.map(tensor_spec, state, is_leaf=lambda v: isinstance(v, nnx.Variable))

  def region(state, x):
    y = nnx.merge(graphdef, state).mix(jax.lax.all_gather(x, TENSOR, axis=1, tiled=True))
    return jax.lax.psum_scatter(y, TENSOR, scatter_dimension=1, tiled=True)

  return _over_tensor(region, (specs, SEQ_SPLIT), SEQ_SPLIT)(state, x) + module.output_bias()


SEQ_SPLIT = P(None, TENSOR, None)  # [batch, seq, d] split along the sequence


def _over_tensor(f, in_specs, out_specs):
  """f in a shard_map over `tensor` within the current (partly manual) mesh. check_vma=False:
  exact GELU's erf fails jax 0.12's varying-axes check inside a shard_map (a JAX bug)."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.shard_map(
    f,
    mesh=_ACTIVE.get().mesh if mesh.empty else mesh,
    axis_names={TENSOR},
    in_specs=in_specs,
    out_specs=out_specs,
    check_vma=False,
  )


def vocab_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """table [vocab, d] rows for tokens [batch, seq]. Under sequence parallelism each device looks up
  the tokens in its vocabulary rows (zeros elsewhere) and a reduce-scatter sums them into its part
  of the sequence: V (Y-1)/Y, where an all-reduce and a slice would move twice that."""
  layout = _ACTIVE.get()
  if layout is None or not layout.sequence_parallel:
    return jnp.take(table, tokens, axis=0)

  def lookup(rows, tokens):
    local = tokens - jax.lax.axis_index(TENSOR) * rows.shape[0]
    mine = (local >= 0) & (local < rows.shape[0])
    x = jnp.where(mine[..., None], jnp.take(rows, jnp.clip(local, 0, rows.shape[0] - 1), axis=0), 0)
    return jax.lax.psum_scatter(x, TENSOR, scatter_dimension=1, tiled=True)

  return _over_tensor(lookup, (P(TENSOR, None), P()), SEQ_SPLIT)(table, tokens)


def vocab_split() -> bool:
  """Layout.vocab_split of the layout a step is being traced under (False outside one)."""
  layout = _ACTIVE.get()
  return layout is not None and layout.vocab_split


def vocab_logits(x: jax.Array, table: jax.Array) -> jax.Array:
  """Logits [batch, seq, vocab] in float32 of x [batch, seq, d] against the tied table. Under
  sequence parallelism x arrives split along the sequence: all-gathered into each device's
  vocabulary slice (its gradient reduce-scattered back), the logits left split over the vocab."""

  def logits(x, table):
    # Over the tokens flattened: the table's gradient is then one dot contracting the token axis of
    # the logits' gradient in place. Contracting (batch, seq) made XLA:CPU write that gradient out
    # transposed first, [vocab, tokens], a whole extra pass over the largest tensor of the step.
    flat = jnp.einsum(
      "nd,vd->nv", x.reshape(-1, x.shape[-1]), table, preferred_element_type=jnp.float32
    )
    return flat.reshape(*x.shape[:-1], table.shape[0])

  layout = _ACTIVE.get()
  if layout is None or not layout.sequence_parallel:
    return logits(x, table)
  return _over_tensor(
    lambda x, rows: logits(jax.lax.all_gather(x, TENSOR, axis=1, tiled=True), rows),
    (SEQ_SPLIT, P(TENSOR, None)),
    P(None, None, TENSOR),
  )(x, table)


def make_layout(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Layout:
  """Builds the layout named by `mesh_cfg.layout` with any axis sizes the config overrides.

  Raises InputError (before anything compiles) when the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  if mesh_cfg.layout not in LAYOUT_PRESETS:
    raise InputError(
      f"config mesh.layout={mesh_cfg.layout!r}: unknown layout. "
      f"Choose one of: {', '.join(LAYOUT_PRESETS)}."
    )
  preset = LAYOUT_PRESETS[mesh_cfg.layout]
  rules = {**RULES, **preset.extra_rules}
  state_rules = {**rules, **preset.state_rules}
  if mesh_cfg.layout == "single":
    devices = devices[:1]
  sizes = {a: preset.sizes.get(a, 1) for a in AXES}
  for a in AXES:
    if mesh_cfg.get(a) is not None:
      sizes[a] = mesh_cfg[a]
  for a, n in sizes.items():
    if n == 0 or n < -1:
      raise InputError(
        f"config mesh.{a}={n}: an axis size must be a positive integer or -1 "
        "(the rest of the devices)."
      )
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise InputError(
      f"config mesh: axes {', '.join(free)} are all -1; at most one axis may take "
      "'the rest of the devices'. Give the others explicit sizes."
    )
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if len(devices) % fixed:
      raise InputError(
        f"layout {mesh_cfg.layout}: the fixed axes ({_fmt(sizes)}) use {fixed} devices, "
        f"which does not divide the {len(devices)} devices available. "
        f"Use --devices as a multiple of {fixed} or change the axis sizes."
      )
    sizes[free[0]] = len(devices) // fixed
  total = math.prod(sizes.values())
  if total != len(devices):
    raise InputError(
      f"layout {mesh_cfg.layout}: mesh {_fmt(sizes)} needs {total} devices but "
      f"{len(devices)} are available. Use --devices {total} or set one axis to -1."
    )
  mesh = Mesh(
    np.asarray(devices).reshape([sizes[a] for a in AXES]),
    AXES,
    axis_types=(AxisType.Auto,) * len(AXES),
  )
  if preset.streams_weights and (sizes["pipe"] > 1 or sizes["tensor"] > 1):
    raise InputError(
      f"layout {mesh_cfg.layout}: a wafer needs no pipeline or tensor parallelism, "
      f"but the mesh has {_fmt(sizes)}. Set mesh.pipe=1 and mesh.tensor=1."
    )
  return Layout(mesh_cfg.layout, mesh, rules, state_rules, preset.streams_weights)


def check_divisible(layout: Layout, abstract_params) -> None:
  """Every sharded dimension of every parameter (and its optimizer state) divides evenly."""
  logical = nnx.get_partition_spec(abstract_params)
  for (path, names), leaf in zip(
    jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0],
    jax.tree.leaves(abstract_params),
  ):
    for rules in (layout.rules, layout.state_rules):
      for dim, (size, axes) in enumerate(zip(leaf.shape, layout.spec(tuple(names), rules))):
        axes = axes_of(axes)
        n = math.prod(layout.mesh.shape[a] for a in axes)
        if size % n:
          raise InputError(
            f"layout {layout.name}: parameter {jax.tree_util.keystr(path)} has {size} along its "
            f"'{names[dim]}' dimension, which does not divide over mesh axes {'x'.join(axes)} "
            f"({n} devices). Choose a model size whose {names[dim]} divides by {n}, or fewer "
            "devices on those axes."
          )


def _fmt(sizes: Mapping[str, int]) -> str:
  return " x ".join(f"{a}={sizes[a]}" for a in AXES)
