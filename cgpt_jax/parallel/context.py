"""Context parallelism: the sequence split over the `context` mesh axis, attention as a ring.

`context` is one of the manual axes of the step's shard_map (spmd.py), as `pipe` is for the
embedding and head: each of its N devices takes two of the sequence's 2N equal chunks, i and
2N-1-i (zig-zag, or head-tail, as Megatron-LM's context parallelism and torchtitan split it; Brandon
et al. 2023, "Striped Attention", arXiv 2311.09431, measure the imbalance it removes), embeds, runs
the blocks and scores the loss on them alone. Every
op of a block is per token except attention, which runs as ring attention (Liu et al. 2023, "Ring
Attention with Blockwise Transformers", arXiv 2310.01889): each device keeps its queries while the
keys and values travel round the ring by `ppermute`, N-1 hops, and the blocks' softmaxes are
combined online through their running maxima and sums, so the [T, T] scores never exist on one
device.

Causal blocks. With c = T/(2N), a device's two query chunks against its own keys need three c x c
blocks: two on the diagonal (causal mask) and its tail against its head (whole). At hop s the keys
and values are device i-s's (mod N): if that device precedes this one, both query chunks see its
head chunk and neither sees its tail; if it follows, the tail queries see both its chunks and the
head queries neither. Either way two whole blocks, and the other two are skipped: 2N+1 blocks per
device, the same on every device, against 4N^2 for the whole [T, T] of one device. Without the
zig-zag (device i holding chunk i of N) device i needs i + 1 of the N blocks of its rows, the last
device N of them, and the step waits for it (`causal_work`).

Per layer run the forward sends each device's K and V, [b, T/N, d/Y] each (Y tensor ways), N-1
times: 2 (N-1)/N b T d/Y elements; the backward, autodiff's transpose of each hop, sends their
gradients back the same way (costs/comm.py). docs/context_parallel.md has the derivations.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from cgpt_jax.errors import InputError

AXIS = "context"


def ways() -> int:
  """N: the devices of the `context` axis, inside a shard_map where it is manual (the step's); 1
  outside one (decoding, which sees whole sequences) or without context parallelism."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.manual_axes:
    return 1
  return mesh.shape[AXIS]


def _chunk_ids(n: int) -> jax.Array:
  """This device's two chunks of the 2N: i and 2N-1-i."""
  i = jax.lax.axis_index(AXIS)
  return jnp.stack([i, 2 * n - 1 - i])


def local_part(inputs: jax.Array, targets: jax.Array, start):
  """(inputs, targets, positions) of this device's chunks of rows [b, T]: [b, 2c] each and the
  chunks' positions [2c]; unchanged (with `start`) without context parallelism."""
  n = ways()
  if n == 1:
    return inputs, targets, start
  b, t = inputs.shape
  c = t // (2 * n)
  ids = _chunk_ids(n)

  def pick(a):
    return jnp.take(a.reshape(b, 2 * n, c), ids, axis=1).reshape(b, 2 * c)

  return pick(inputs), pick(targets), (ids[:, None] * c + jnp.arange(c)).reshape(2 * c)


def whole_sequence(x: jax.Array) -> jax.Array:
  """Per-token values [b, 2c] of this device's chunks -> the rows' whole sequences [b, T] in
  order, on every device of the axis (an all-gather: evaluation's per-token losses)."""
  n = ways()
  if n == 1:
    return x
  b = x.shape[0]
  parts = jax.lax.all_gather(x.reshape(b, 2, -1), AXIS)  # [N, b, 2, c]: device i, chunks i, 2N-1-i
  chunks = jnp.concatenate([parts[:, :, 0], parts[::-1, :, 1]])  # [2N, b, c] in sequence order
  return chunks.transpose(1, 0, 2).reshape(b, -1)


class _Partial:
  """Softmax attention of some queries over some of the keys, kept as the running maximum of the
  scores m [b, h, q], the sum of exp(score - m) l [b, h, q] and the exp-weighted sum of the values
  acc [b, q, h, e], all float32: two of these over disjoint keys merge exactly (`merge`)."""

  def __init__(self, m, l, acc):
    self.m, self.l, self.acc = m, l, acc

  def merge(self, other: "_Partial") -> "_Partial":
    m = jnp.maximum(self.m, other.m)
    a, b = jnp.exp(self.m - m), jnp.exp(other.m - m)
    return _Partial(
      m, self.l * a + other.l * b, self.acc * _per_query(a) + other.acc * _per_query(b)
    )

  def select(self, pred, other: "_Partial") -> "_Partial":
    """self where pred (a traced scalar), else other."""
    return _Partial(*(jnp.where(pred, x, y) for x, y in zip(self.parts, other.parts)))

  @property
  def parts(self):
    return self.m, self.l, self.acc

  def result(self, dtype) -> jax.Array:
    return (self.acc / _per_query(self.l)).astype(dtype)


def _per_query(x: jax.Array) -> jax.Array:
  """[b, h, q] -> [b, q, h, 1], to scale acc."""
  return x.transpose(0, 2, 1)[..., None]


def _block(q, k, v, scale: float, causal: bool) -> _Partial:
  """One c x c block of queries q against keys and values k, v [b, c, h, e]; `causal` for a
  diagonal block (query j sees keys 0..j)."""
  scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    c = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((c, c), bool)), scores, jnp.finfo(scores.dtype).min)
  # The maximum only keeps exp in range: the result does not depend on it, so no gradient flows
  # through it (the exact gradient, and no backward pass over the max).
  m = jax.lax.stop_gradient(scores.max(-1))
  p = jnp.exp(scores - m[..., None])
  acc = jnp.einsum("bhqk,bkhe->bqhe", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return _Partial(m, p.sum(-1), acc)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """Causal attention of this device's queries, keys and values [b, 2c, h, e] (its chunks i and
  2N-1-i, local_part) against the whole sequence's: the context [b, 2c, h, e] in q's dtype."""
  n = ways()
  i = jax.lax.axis_index(AXIS)
  c = q.shape[1] // 2
  q0, q1 = q[:, :c], q[:, c:]
  k0, k1, v0, v1 = k[:, :c], k[:, c:], v[:, :c], v[:, c:]
  head = _block(q0, k0, v0, scale, causal=True)  # chunk i's queries
  tail = _block(q1, k0, v0, scale, causal=False).merge(_block(q1, k1, v1, scale, causal=True))
  ring = [(j, (j + 1) % n) for j in range(n)]
  for hop in range(1, n):
    k, v = jax.lax.ppermute((k, v), AXIS, ring)  # device j = i-hop's (mod N): chunks j, 2N-1-j
    k0, k1, v0, v1 = k[:, :c], k[:, c:], v[:, :c], v[:, c:]
    # j < i: its head precedes both of ours and its tail follows both. j > i: its head is between
    # ours and its tail too, so only our tail sees them. Either way our tail sees its head.
    before = hop <= i
    tail = tail.merge(_block(q1, k0, v0, scale, causal=False))
    other = _block(
      jnp.where(before, q0, q1),
      jnp.where(before, k0, k1),
      jnp.where(before, v0, v1),
      scale,
      causal=False,
    )
    merged = head.select(before, tail).merge(other)
    head, tail = merged.select(before, head), tail.select(before, merged)
  return jnp.concatenate([head.result(q.dtype), tail.result(q.dtype)], axis=1)


def score_fraction(n: int) -> Fraction:
  """The share of the whole [T, T] scores the N devices compute together: each 2N+1 blocks of c^2
  of the 4N^2 c^2, (2N+1)/(4N) (the causal half, and the masked halves of the 2N diagonal blocks);
  1 without a ring (the dense attention computes the masked half too)."""
  return Fraction(2 * n + 1, 4 * n) if n > 1 else Fraction(1)


def causal_work(n: int, seq_len: int, zigzag: bool = True) -> np.ndarray:
  """Query-key pairs each of the N devices must score under the causal mask (k <= q): with the
  zig-zag, chunks i and 2N-1-i; without, the contiguous chunk i of N."""
  pairs = np.arange(1, seq_len + 1)  # query q sees q + 1 keys
  if not zigzag:
    return pairs.reshape(n, -1).sum(1)
  chunks = pairs.reshape(2 * n, -1).sum(1)
  return chunks[:n] + chunks[::-1][:n]


def describe(n: int, seq_len: int) -> dict:
  """Context parallelism's work split, for plan.json and summary.json: each device's c x c score
  blocks per head and layer, and its query-key pairs of one sequence under the causal mask, with
  their max / mean over the devices, with and without the zig-zag."""
  balanced, contiguous = (causal_work(n, seq_len, z) for z in (True, False))
  return {
    "ways": n,
    "chunks_per_device": 2,
    "score_blocks_per_device": 2 * n + 1,
    "score_fraction": float(score_fraction(n)),
    "causal_pairs_per_device": balanced.tolist(),
    "imbalance_zigzag": float(balanced.max() / balanced.mean()),
    "imbalance_contiguous": float(contiguous.max() / contiguous.mean()),
  }


def check(cfg, layout) -> None:
  """Refuses, before anything compiles, what the ring cannot split: a sequence that is not 2N equal
  chunks, and a pipeline (whose stages split the sequence for the embedding and head themselves)."""
  n = layout.axis_sizes[AXIS]
  if n == 1:
    return
  if layout.axis_sizes["pipe"] > 1:
    raise InputError(
      f"layout {layout.name}: context parallelism (mesh.context={n}) does not combine with a "
      f"pipeline (mesh.pipe={layout.axis_sizes['pipe']}). Set mesh.pipe=1 or mesh.context=1."
    )
  t = cfg.data.seq_len
  if t % (2 * n):
    raise InputError(
      f"config data.seq_len={t}: not divisible by 2 x mesh.context = {2 * n} (each of the {n} "
      f"context devices holds two equal chunks). Use a multiple of {2 * n}, e.g. "
      f"--config.data.seq_len={max(2 * n, t // (2 * n) * 2 * n)}."
    )
