"""Loss and perplexity of a model on a text, with a sliding window (the Hugging Face recipe).

The text is one token stream. A window is `window` + 1 tokens starting every `stride` tokens: the
model reads its first `window` and predicts each next token. Each window scores only the positions
the previous one did not, so every token after the first is predicted exactly once, from between
window - stride + 1 and window tokens of context (all there is, near the start). stride = window
gives non-overlapping windows (fast, least context); a smaller stride costs window/stride times
the compute for more context per token. Perplexity = exp(total negative log-likelihood / tokens
scored).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from cgpt_jax.errors import InputError


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first scored position) per window over a stream of n_tokens: the window holds
  tokens begin..end-1 and scores positions first..end-1, position p predicted from tokens
  begin..p-1. Together they score positions 1..n_tokens-1, each once."""
  if window < 1 or not 1 <= stride <= window:
    raise InputError(
      f"evaluation window={window}, stride={stride}: need window >= 1 and "
      "1 <= stride <= window. E.g. --config.evaluate.stride=window/2."
    )
  out, scored_to = [], 1
  for begin in range(0, max(n_tokens - 1, 1), stride):
    end = min(begin + window + 1, n_tokens)
    if end <= scored_to:
      continue
    out.append((begin, end, scored_to))  # scored_to > begin: the previous window reached past it
    scored_to = end
    if end == n_tokens:
      break
  return out


def sliding_window_loss(
  params, token_nll, tokens: np.ndarray, window: int, stride: int, batch: int
) -> dict:
  """Negative log-likelihood over the scored tokens. `token_nll(params, rows [B, window + 1])` is
  the per-token loss [B, window] of predicting rows[:, 1:] from rows[:, :-1]; windows go through it
  `batch` at a time, padded to a fixed shape so one compiled program serves them all."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.size < 2:
    raise InputError("the evaluation text has fewer than 2 tokens; give a longer text.")
  spans = windows(tokens.size, window, stride)

  @jax.jit
  def summed(params, rows, mask):
    return jnp.sum(token_nll(params, rows) * mask), jnp.sum(mask)

  total, count = 0.0, 0
  for i in range(0, len(spans), batch):
    rows = np.zeros((batch, window + 1), np.int32)
    mask = np.zeros((batch, window), np.float32)
    for row, (begin, end, first) in enumerate(spans[i : i + batch]):
      rows[row, : end - begin] = tokens[begin:end]
      mask[row, first - begin - 1 : end - begin - 1] = (
        1.0  # column j predicts position begin + 1 + j
      )
    nll, scored = summed(params, rows, mask)
    total += float(nll)
    count += int(round(float(scored)))
  loss = total / count
  perplexity = math.exp(loss) if loss < math.log(np.finfo(np.float64).max) else math.inf
  return {
    "loss": loss,
    "perplexity": perplexity,
    "tokens_scored": count,
    "tokens": int(tokens.size),
    "window": window,
    "stride": stride,
    "windows": len(spans),
  }
