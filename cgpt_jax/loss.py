"""The next-token loss: cross entropy over the (padded, possibly vocab-parallel) logits, with its
gradient written out as one softmax - one-hot pass."""

import functools

import jax
import jax.numpy as jnp

from cgpt_jax.parallel.layouts import vocab_split


def token_nll(logits: jax.Array, targets: jax.Array, vocab_size: int | None = None) -> jax.Array:
  """Next-token cross entropy of each position [batch, seq] in nats, computed in float32. Logits
  past `vocab_size` (the table's padding) are left out.

  With the vocabulary split over a tensor axis the target's logit is picked with a compare-and-sum
  over it rather than a gather, so each device reduces its own slice and only [batch, seq] partial
  sums cross devices: the full logits are never gathered on one device. Whole, a gather reads one
  logit per position where the compare-and-sum is one more pass over all of them.

  The gradient is written out, softmax - one-hot, one elementwise pass over [batch, seq, vocab]
  from the kept logits and log-sum-exp: autodiff of logsumexp and of the pick re-derives the max,
  the exponentials and the mask in passes of their own, each as large as the logits (at the 111M
  widths the vocabulary is 72% of the FLOPs and those passes were 12% of a CPU step).
  """
  with jax.named_scope("loss"):
    return _nll(logits, targets, vocab_size or logits.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nll(logits, targets, vocab_size):
  return _nll_and_lse(logits, targets, vocab_size)[0]


def _real(logits, targets, vocab_size):
  """The float32 logits with the padding at the lowest float, and where the targets are."""
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  logits = logits.astype(jnp.float32)
  if vocab_size < logits.shape[-1]:
    logits = jnp.where(vocab < vocab_size, logits, jnp.finfo(jnp.float32).min)
  return logits, vocab == targets[..., None]


def _nll_and_lse(logits, targets, vocab_size):
  real, is_target = _real(logits, targets, vocab_size)
  lse = jax.nn.logsumexp(real, axis=-1)
  if vocab_split():
    picked = jnp.sum(jnp.where(is_target, real, 0.0), axis=-1)
  else:  # targets are real tokens: never a padded logit
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return lse - picked, lse


def _nll_fwd(logits, targets, vocab_size):
  nll, lse = _nll_and_lse(logits, targets, vocab_size)
  return nll, (logits, lse, targets)


def _nll_bwd(vocab_size, residuals, g):
  logits, lse, targets = residuals
  real, is_target = _real(logits, targets, vocab_size)
  grad = g[..., None] * (jnp.exp(real - lse[..., None]) - is_target)
  return grad.astype(logits.dtype), None


_nll.defvjp(_nll_fwd, _nll_bwd)
