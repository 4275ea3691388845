"""The step as one SPMD program: a shard_map over every mesh axis but `tensor`, its collectives
written out.

Left to the partitioner, the step moved 1.3-2.5x its algorithm's bytes: XLA's CPU pipeline
all-reduces and slices where ZeRO needs a reduce-scatter, reduces the tied embedding's lookup and
head gradients separately, and reduces a pipeline's embedding over `data` and again over `pipe`. So
the axes that share the batch (`data`, `fsdp`), the pipeline's `pipe` and `context` (which shares
the sequence, context.py) are manual here, and every collective over them is one of these, decided
by the layout's tables alone (and context parallelism's ring, written in context.py):

- Weights. A weight split over a manual axis (fsdp: ZeRO-3, the wafer) is all-gathered where it is
  used: once per micro-step for the embedding, positions and final norm, per layer inside the layer
  scan for the blocks, where the backward gathers it again rather than keep every layer's whole
  weights alive (FSDP, weight streaming). The gather's transpose reduce-scatters the gradient back
  to the shard, in float32 whatever dtype the weights crossed in (`gather`).
- Gradients. A gradient replicated over manual axes is a partial sum on each device. Micro-steps of
  gradient accumulation add to it locally; then it is reduced once per step: reduce-scattered over
  the axes its optimizer state is split on (ZeRO-1), all-reduced over the rest (`reduce_gradient`).
  The tied embedding's two contributions are summed by autodiff before that one reduction.
- The loss: each device's mean over its own tokens, summed over the manual axes with weight 1/n.

`tensor` stays automatic: Megatron's tensor-parallel all-reduces are what the partitioner emits
(measured equal to the formula), and sequence parallelism's transitions are written in layouts.py's
tensor regions.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

MANUAL = ("data", "pipe", "fsdp", "context")


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def manual_part(spec: P) -> P:
  """`spec` with only the manual axes: what a shard_map over MANUAL takes as its in/out spec."""
  return P(*(_entry(tuple(a for a in axes_of(e) if a in MANUAL)) for e in spec))


def tensor_part(spec: P) -> P:
  """`spec` with only the axes the shard_map leaves to the partitioner (tensor)."""
  return P(*(_entry(tuple(a for a in axes_of(e) if a not in MANUAL)) for e in spec))


def is_split(spec: P) -> bool:
  return any(axes_of(e) for e in spec)


def _within_tensor(f, tensor: P):
  """f, run where `tensor` (the weight's split over the tensor axis, which the step's shard_map
  leaves to the partitioner) is manual too. The partitioner does not carry a tensor split through
  a manual all-gather: it would replicate the weight over tensor first (measured: 9x the bytes)."""
  if not is_split(tensor):
    return f
  return jax.shard_map(
    f,
    mesh=jax.sharding.get_abstract_mesh(),
    axis_names={"tensor"},
    in_specs=tensor,
    out_specs=tensor,
    check_vma=False,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def gather(shard: jax.Array, spec: P, tensor: P, dtype) -> jax.Array:
  """The whole weight from this device's shard (split as `spec` over manual axes, and as `tensor`
  over the tensor axis, which it stays), cast to `dtype` first so that a bfloat16 run gathers
  bfloat16. Its gradient is reduce-scattered back in float32, the precision of the master weights
  and the optimizer."""

  def gather_all(x):
    x = x.astype(dtype)
    for dim, entry in enumerate(spec):
      if axes_of(entry):
        x = jax.lax.all_gather(x, axes_of(entry), axis=dim, tiled=True)
    return x

  return _within_tensor(gather_all, tensor)(shard)


def _gather_fwd(shard, spec, tensor, dtype):
  return gather(shard, spec, tensor, dtype), None


def _gather_bwd(spec, tensor, dtype, _, g):
  def scatter_all(g):
    g = g.astype(jnp.float32)
    for dim, entry in reversed(list(enumerate(spec))):
      if axes_of(entry):
        g = jax.lax.psum_scatter(g, axes_of(entry), scatter_dimension=dim, tiled=True)
    return g

  return (_within_tensor(scatter_all, tensor)(g),)


gather.defvjp(_gather_fwd, _gather_bwd)


def materialise(shard: jax.Array, spec: P, tensor: P, dtype) -> jax.Array:
  """A weight as the forward uses it: gathered if a manual axis splits it (`spec`; `tensor` is its
  split over the tensor axis), in `dtype`."""
  return gather(shard, spec, tensor, dtype) if is_split(spec) else shard.astype(dtype)


def keep_all_but_gathered(prim, *_, **params) -> bool:
  """Remat policy: keep every value for the backward except what an all-gather made (a whole
  weight, `gather`), which the backward gathers again from the kept shard."""
  return not _gathers(prim, params)


def _gathers(prim, params) -> bool:
  """prim is an all-gather, or calls one (`gather` is a custom_vjp, maybe around a shard_map)."""
  if prim.name == "all_gather":
    return True
  for key in ("call_jaxpr", "jaxpr"):
    called = params.get(key)
    if called is not None and any(
      _gathers(e.primitive, e.params) for e in getattr(called, "jaxpr", called).eqns
    ):
      return True
  return False


def reduce_gradient(g: jax.Array, param: P, state: P, sizes: dict[str, int]) -> jax.Array:
  """One device's partial gradient -> its share of the sum over the devices that share the batch.

  `param` and `state` are the manual parts of the parameter's and its optimizer state's specs. Axes
  that split the parameter itself were reduced by `gather`'s transpose; of the axes it is
  replicated on, those its state is split on are reduce-scattered along that dimension (ZeRO-1),
  the rest all-reduced.
  """
  for dim, (p, q) in enumerate(zip(param, state)):
    extra = tuple(a for a in axes_of(q) if a not in axes_of(p) and sizes[a] > 1)
    if extra:
      g = jax.lax.psum_scatter(g, extra, scatter_dimension=dim, tiled=True)
  held = {a for e in (*param, *state) for a in axes_of(e)}
  rest = tuple(a for a in MANUAL if sizes[a] > 1 and a not in held)
  return jax.lax.psum(g, rest) if rest else g


def wire_dtype(dtype, backend: str | None = None):
  """The dtype a collective of `dtype` values moves on `backend` (default: this process's).

  XLA's CPU compiler moves every 16-bit collective as float32: it converts bf16 all-gathers,
  all-reduces, reduce-scatters and collective-permutes to f32 (seen in the compiled HLO), and aborts
  ("Invalid binary instruction opcode copy") on a bf16 collective-permute in the pipeline's loop
  unless the program casts first. Other backends move the compute dtype.
  """
  if (backend or jax.default_backend()) == "cpu" and jnp.dtype(dtype).itemsize < 4:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(dtype)


def shares(sizes: dict[str, int]) -> int:
  """Devices among which the step's tokens are divided: data x fsdp rows, x pipe and context
  sequence parts."""
  return math.prod(sizes[a] for a in MANUAL)


def sized(sizes: dict[str, int]) -> tuple[str, ...]:
  return tuple(a for a in MANUAL if sizes[a] > 1)
