"""Autoregressive decoding with a key/value cache: greedy, sampling and beam search.

The prefill runs the prompt once and fills a per-layer cache [layers, batch, max_len, heads,
head_dim]; each decode step then embeds one token at its position, attends to the cache up to it
and writes its own keys and values, so a new token costs the matmuls of one position (plus reading
max_len cached slots, masked past the position). Both are jitted for a fixed max_len (the sequence
rounded up to a power of two, at most n_positions), so the decode step compiles once per length.

The loop over new tokens runs on the host: the next token is chosen on the device from the step's
logits, while the n-gram ban and the beam hypotheses, which are bookkeeping rather than arithmetic,
are plain numpy. That costs one device round trip per token and keeps them easy to check against
Hugging Face's semantics.
"""

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cgpt_jax import model as model_lib
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import layouts

METHODS = ("greedy", "sample", "beam")


class KVCache(NamedTuple):
  keys: jax.Array  # [layers, batch, max_len, heads, head_dim] in the compute dtype
  values: jax.Array


class Decoder(NamedTuple):
  """Jitted pieces of cached decoding for one model, cache length and layout."""

  prefill: Callable  # (params, tokens [batch, t]) -> (last logits [batch, vocab], cache)
  step: Callable  # (params, cache, tokens [batch, 1], position) -> (logits [batch, vocab], cache)
  reorder: Callable  # (cache, rows [n]) -> the cache of batch rows `rows` (beams' parents)
  max_len: int


def generate(
  graphdef,
  params,
  cfg: ml_collections.ConfigDict,
  prompt_ids: np.ndarray,
  max_new_tokens: int,
  *,
  method: str = "greedy",
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  num_beams: int = 4,
  length_penalty: float = 1.0,
  no_repeat_ngram_size: int = 0,
  eos_id: int | None = None,
  seed: int = 0,
  layout: layouts.Layout | None = None,
) -> np.ndarray:
  """New token ids [<= max_new_tokens] continuing `prompt_ids` (1-D), with a key/value cache.

  method: "greedy"; "sample" (temperature, then top_k highest logits, 0 = all, then top_p nucleus,
  as Hugging Face's warpers; temperature 0 is greedy; seeded by `seed`); "beam" (num_beams
  hypotheses scored sum log p / new_tokens**length_penalty; with an eos_id a hypothesis ends at eos
  and the search stops once num_beams have ended). no_repeat_ngram_size > 0 bans, for any method,
  a token that would complete an n-gram already in the sequence (prompt included, as Hugging Face).
  Greedy and sampling stop after eos_id. `layout` places the parameters by their logical names and
  runs under it. Raises InputError for an empty or out-of-vocabulary prompt, a sequence longer than
  cfg.n_positions, or an invalid option.
  """
  prompt = check_prompt(cfg, prompt_ids, max_new_tokens)
  _check_options(
    cfg, method, temperature, top_k, top_p, num_beams, length_penalty, no_repeat_ngram_size, eos_id
  )
  layout, params = _placed(params, cfg, layout)
  params = model_lib.compute_params(params, cfg.dtype)
  decoder = cached_decoder(graphdef, cfg, cache_len(cfg, len(prompt) + max_new_tokens), layout)
  if method == "beam":
    return _beam_search(
      decoder,
      params,
      prompt,
      max_new_tokens,
      num_beams,
      length_penalty,
      no_repeat_ngram_size,
      eos_id,
      cfg.vocab_size,
    )
  if method == "sample" and temperature > 0:
    key = jax.random.key(seed)
    choose = lambda logits, banned, i: _sample(
      logits, banned, jax.random.fold_in(key, i), temperature, top_k, top_p
    )
  else:
    choose = lambda logits, banned, i: _greedy(logits, banned)
  return _decode(
    decoder, params, prompt, max_new_tokens, choose, no_repeat_ngram_size, eos_id, cfg.vocab_size
  )


def greedy_uncached(
  graphdef,
  params,
  cfg: ml_collections.ConfigDict,
  prompt_ids: np.ndarray,
  max_new_tokens: int,
  layout: layouts.Layout | None = None,
) -> np.ndarray:
  """Reference greedy decoding without a cache: the full forward over the whole sequence for
  every new token. The sequence is padded to its final length so the forward compiles once; causal
  attention keeps the padding out of every position before it."""
  prompt = check_prompt(cfg, prompt_ids, max_new_tokens)
  layout, params = _placed(params, cfg, layout)
  active = layout.active if layout else contextlib.nullcontext

  @jax.jit
  def forward(params, tokens):
    with active():
      return nnx.merge(graphdef, model_lib.compute_params(params, cfg.dtype))(tokens)

  seq = np.zeros((1, len(prompt) + max_new_tokens), np.int32)
  seq[0, : len(prompt)] = prompt
  for t in range(len(prompt), seq.shape[1]):
    seq[0, t] = np.argmax(np.asarray(forward(params, seq))[0, t - 1, : cfg.vocab_size])
  return seq[0, len(prompt) :]


# ----------------------------------------------------------------------------------------------
# The cached forward
# ----------------------------------------------------------------------------------------------
def make_decoder(
  graphdef, cfg: ml_collections.ConfigDict, max_len: int, layout: layouts.Layout | None = None
) -> Decoder:
  """Jits prefill, decode step and cache reorder for a cache of max_len positions. `layout` is a
  decoding_layout(); the `params` given to them are already placed for it (place()) and in the
  compute dtype (model_lib.compute_params)."""
  active = layout.active if layout else contextlib.nullcontext

  def prefill(params, tokens):
    with active():
      return _forward(graphdef, cfg, params, _empty_cache(cfg, tokens.shape[0], max_len), tokens, 0)

  def step(params, cache, tokens, position):
    with active():
      return _forward(graphdef, cfg, params, cache, tokens, position)

  def reorder(cache, rows):
    return jax.tree.map(lambda c: c[:, rows], cache)

  # The old cache is dead once a step has written the new one: donating it lets XLA update in place.
  return Decoder(jax.jit(prefill), jax.jit(step, donate_argnums=1), jax.jit(reorder), max_len)


def _forward(graphdef, cfg, params, cache: KVCache, tokens, start):
  """Logits at the last of `tokens` (at positions start, start + 1, ...) over the real vocabulary,
  and the cache with their keys and values written in."""
  model = nnx.merge(graphdef, params)
  blocks_def, stacked = nnx.split(model.blocks)

  def layer(x, layer_in):
    block_params, keys, values = layer_in
    return nnx.merge(blocks_def, block_params).cached(x, (keys, values), start)

  x, (keys, values) = jax.lax.scan(
    layer,
    model.embed(tokens, start),
    (stacked, cache.keys, cache.values),
    unroll=min(cfg.scan_unroll, cfg.n_layers),
  )
  # Only the last position's logits choose the next token: the head runs on it alone.
  logits = model.head(x[:, -1:])[:, 0, : cfg.vocab_size]
  return logits, KVCache(keys, values)


def _empty_cache(cfg, batch: int, max_len: int) -> KVCache:
  head_dim = cfg.d_model // cfg.n_heads
  shape = (cfg.n_layers, batch, max_len, cfg.n_heads, head_dim)
  return KVCache(*(jnp.zeros(shape, cfg.dtype) for _ in range(2)))


def cache_len(cfg, total: int) -> int:
  """Cache positions for a sequence of `total` tokens: the next power of two, at most n_positions,
  so that nearby lengths share one compiled step."""
  return min(cfg.n_positions, 1 << (total - 1).bit_length())


_DECODERS: dict = {}


def cached_decoder(graphdef, cfg, max_len: int, layout: layouts.Layout | None) -> Decoder:
  """make_decoder, memoised so that repeated generate() calls reuse the compiled functions. A
  graphdef holds its config dict and cannot be hashed: it is known by id, which stays unique while
  the memoised decoder keeps it alive."""
  layout_key = layout and (
    layout.mesh,
    tuple(sorted((k, tuple(v)) for k, v in layout.rules.items())),
  )
  key = (id(graphdef), ml_collections.FrozenConfigDict(cfg), max_len, layout_key)
  if key not in _DECODERS:
    _DECODERS[key] = make_decoder(graphdef, cfg, max_len, layout)
  return _DECODERS[key]


def decoding_layout(layout: layouts.Layout) -> layouts.Layout:
  """`layout` for decoding: parameters and model axes (heads, mlp, vocab) split as it says, but not
  the batch or sequence, which are one prompt (or a few beams) and one position per step."""
  unsplit = {name: () for name in ("batch", "seq", "residual_seq")}
  return dataclasses.replace(layout, rules={**layout.rules, **unsplit})


def _placed(params, cfg, layout: layouts.Layout | None):
  """(decoding layout, params placed for it); (None, params) on the default device."""
  if layout is None:
    return None, params
  layout = decoding_layout(layout)
  return layout, place(params, cfg, layout)


def place(params, cfg, layout: layouts.Layout):
  """params on layout's devices, each sharded by its logical names (as training places them)."""
  return jax.device_put(params, layout.tree_shardings(model_lib.abstract_model(cfg)[1]))


# ----------------------------------------------------------------------------------------------
# Choosing tokens
# ----------------------------------------------------------------------------------------------
@jax.jit
def _greedy(logits, banned):
  return jnp.argmax(jnp.where(banned, -jnp.inf, logits), axis=-1)


@jax.jit
def _sample(logits, banned, key, temperature, top_k, top_p):
  logits = filter_logits(jnp.where(banned, -jnp.inf, logits) / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1)


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
  """-inf for the tokens outside the top_k highest logits (0 = no limit), then outside the nucleus:
  the most likely tokens whose probabilities, renormalised after top_k, first reach top_p (Hugging
  Face's TopK and TopP warpers; the most likely token is always kept, ties at a cut are kept)."""
  v = logits.shape[-1]
  desc = -jnp.sort(-logits, axis=-1)
  kth = jnp.take(desc, jnp.clip(top_k, 1, v) - 1, axis=-1)[..., None]
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(desc, axis=-1)
  # A token is in the nucleus while the tokens ranked above it hold less than top_p.
  above = jnp.cumsum(probs, axis=-1)[..., :-1]
  above = jnp.concatenate([jnp.zeros_like(above[..., :1]), above], axis=-1)
  n_keep = jnp.sum(above < top_p, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def banned_tokens(seq: list[int], n: int) -> list[int]:
  """Tokens that would complete an n-gram already in seq (Hugging Face's no_repeat_ngram_size):
  those that followed an earlier occurrence of seq's last n - 1 tokens."""
  if n == 0 or len(seq) + 1 < n:
    return []
  prefix = seq[len(seq) - n + 1 :]
  return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == prefix]


def _banned_mask(seqs: list[list[int]], n: int, vocab: int) -> np.ndarray:
  mask = np.zeros((len(seqs), vocab), bool)
  for row, seq in zip(mask, seqs):
    row[banned_tokens(seq, n)] = True
  return mask


def _decode(decoder: Decoder, params, prompt, n_new, choose, ngram, eos_id, vocab) -> np.ndarray:
  """One sequence, `choose(logits, banned, i)` picking the i-th new token."""
  logits, cache = decoder.prefill(params, prompt[None])
  seq = list(prompt)
  for i in range(n_new):
    seq.append(int(choose(logits, _banned_mask([seq], ngram, vocab), i)[0]))
    if seq[-1] == eos_id or i == n_new - 1:
      break
    logits, cache = decoder.step(
      params, cache, np.asarray([seq[-1:]], np.int32), np.int32(len(seq) - 1)
    )
  return np.asarray(seq[len(prompt) :], np.int32)


def _beam_search(
  decoder: Decoder, params, prompt, n_new, num_beams, length_penalty, ngram, eos_id, vocab
) -> np.ndarray:
  """Hugging Face's beam search with early_stopping=True, for one prompt.

  Each step extends every beam by every token, ranks the candidates by their sum of log-probs and
  keeps the best num_beams that do not end at eos; a candidate ending at eos among the best
  num_beams is a finished hypothesis. The search stops when num_beams hypotheses have finished, or
  after n_new tokens, when the running beams finish too; the best score sum / length**penalty wins.
  """
  logits, cache = decoder.prefill(params, prompt[None])
  cache = decoder.reorder(cache, np.zeros(num_beams, np.int32))
  logprobs = np.repeat(_log_softmax(logits), num_beams, axis=0)
  seqs = [list(prompt)] * num_beams
  # The beams start as copies of one: only the first may extend, or the best would be duplicates.
  scores = np.full(num_beams, -np.inf)
  scores[0] = 0.0
  finished = []  # (score, new tokens)
  for i in range(n_new):
    logprobs[_banned_mask(seqs, ngram, vocab)] = -np.inf
    candidates = (scores[:, None] + logprobs).ravel()
    kept = []  # (parent beam, token, score)
    for rank, flat in enumerate(np.argsort(-candidates, kind="stable")):
      beam, token = divmod(int(flat), vocab)
      if token != eos_id:
        kept.append((beam, token, candidates[flat]))
      elif rank < num_beams and np.isfinite(candidates[flat]):  # -inf: a placeholder or banned
        finished.append((candidates[flat] / (i + 1) ** length_penalty, seqs[beam] + [token]))
      if len(kept) == num_beams:
        break
    parents, tokens, scores = (np.asarray(column) for column in zip(*kept))
    seqs = [seqs[b] + [int(t)] for b, t in zip(parents, tokens)]
    if len(finished) >= num_beams:
      break
    if i == n_new - 1:
      finished += [(s / n_new**length_penalty, seq) for s, seq in zip(scores, seqs)]
      break
    cache = decoder.reorder(cache, parents.astype(np.int32))
    logits, cache = decoder.step(
      params, cache, tokens.astype(np.int32)[:, None], np.int32(len(prompt) + i)
    )
    logprobs = _log_softmax(logits)
  best = max(finished, key=lambda f: f[0])[1]
  return np.asarray(best[len(prompt) :], np.int32)


def _log_softmax(logits) -> np.ndarray:
  """Log-probabilities on the host in float64, so beam scores sum without float32 rounding."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def check_prompt(cfg, prompt_ids, max_new_tokens: int) -> np.ndarray:
  """The prompt as int32, after checking it and the length against the model."""
  prompt = np.asarray(prompt_ids)
  if prompt.ndim != 1 or prompt.size == 0:
    raise InputError(
      f"generate: the prompt must be a non-empty 1-D array of token ids, got shape "
      f"{prompt.shape}. Encode at least one token (e.g. a newline)."
    )
  if (
    not np.issubdtype(prompt.dtype, np.integer)
    or prompt.min() < 0
    or prompt.max() >= cfg.vocab_size
  ):
    raise InputError(
      f"generate: prompt ids must be integers in [0, {cfg.vocab_size}) (the model's "
      "vocabulary). Encode it with the tokenizer the model was trained with."
    )
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise InputError(f"generate: max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
  if prompt.size >= cfg.n_positions:
    raise InputError(
      f"generate: the prompt has {prompt.size} tokens, which leaves none of the "
      f"model's {cfg.n_positions} positions for new tokens. Shorten the prompt to at "
      f"most {cfg.n_positions - 1} tokens."
    )
  if prompt.size + max_new_tokens > cfg.n_positions:
    raise InputError(
      f"generate: a prompt of {prompt.size} tokens plus max_new_tokens="
      f"{max_new_tokens} is longer than the model's {cfg.n_positions} positions. "
      f"Shorten the prompt or ask for at most {cfg.n_positions - prompt.size} "
      "tokens (--config.generate.max_new_tokens)."
    )
  return prompt.astype(np.int32)


def _check_options(
  cfg, method, temperature, top_k, top_p, num_beams, length_penalty, no_repeat_ngram_size, eos_id
) -> None:
  def fail(what: str, fix: str):
    raise InputError(f"generate: {what}. {fix}")

  if method not in METHODS:
    fail(f"unknown method {method!r}", f"Choose one of: {', '.join(METHODS)}.")
  if not temperature >= 0:
    fail(
      f"temperature={temperature!r} must be >= 0",
      "Use 1 for the model's distribution, 0 for greedy, in between for a sharper one.",
    )
  if not _is_int(top_k) or top_k < 0:
    fail(f"top_k={top_k!r} must be an integer >= 0", "Use 0 to keep every token.")
  if not 0 < top_p <= 1:
    fail(
      f"top_p={top_p!r} must be in (0, 1]",
      "Use 1 to keep every token, e.g. 0.9 for the nucleus of 90% probability.",
    )
  if not _is_int(num_beams) or num_beams < 1:
    fail(f"num_beams={num_beams!r} must be an integer >= 1", "E.g. 4; 1 is greedy.")
  if not math.isfinite(length_penalty):
    fail(
      f"length_penalty={length_penalty!r} must be finite",
      "Use 1 for the mean log-prob, 0 for the sum.",
    )
  if not _is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
    fail(
      f"no_repeat_ngram_size={no_repeat_ngram_size!r} must be an integer >= 0", "Use 0 for no ban."
    )
  if eos_id is not None and not (_is_int(eos_id) and 0 <= eos_id < cfg.vocab_size):
    fail(
      f"eos_id={eos_id!r} is not a token id in [0, {cfg.vocab_size})",
      "Pass the tokenizer's end-of-text id, or None.",
    )


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
