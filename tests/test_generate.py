"""KV-cached decoding: the cache changes the cost, never the tokens; sampling and beam search do
what Hugging Face's options promise."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import config as config_lib
from cgpt_jax import generate as gen
from cgpt_jax import model as model_lib
from cgpt_jax.costs import analysis
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import layouts

PROMPT = np.array([1, 2, 3, 4, 5])
NEW = 24  # prompt + new = 29 tokens: one 32-slot cache, compiled once per model


def tiny(mup=False, n_heads=4, vocab_size=65):
  """(graphdef, params, cfg) of a random 2-layer model. Its weights are larger than the init's, so
  greedy decoding wanders over the vocabulary instead of echoing the last prompt token, and the
  top two logits stay far apart compared with float32 rounding (>= 1e-2 here, rounding ~1e-6)."""
  c = config_lib.base_config().model
  c.update(n_layers=2, d_model=64, n_heads=n_heads, vocab_size=vocab_size, n_positions=64, mup=mup)
  if mup:  # the embedding is multiplied by 10: the hidden weights must be larger still to matter
    c.update(init_std=0.02, hidden_init_std=0.5, residual_init_std=0.5)
  else:
    c.update(init_std=0.2, hidden_init_std=0.2, residual_init_std=0.2)
  config_lib.resolve_model(c)
  graphdef, params = nnx.split(model_lib.GPT(c, rngs=nnx.Rngs(0)))
  return graphdef, params, c


@pytest.fixture(scope="module")
def model():
  return tiny()


def full_logits(graphdef, params, cfg, seq) -> np.ndarray:
  """The training forward over the whole sequence: [len(seq), vocab]."""
  return np.asarray(nnx.merge(graphdef, params)(np.asarray(seq)[None]))[0, :, : cfg.vocab_size]


def has_repeated_ngram(seq, n: int) -> bool:
  grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
  return len(set(grams)) < len(grams)


@pytest.mark.parametrize("mup", [False, True])
def test_cached_greedy_is_the_full_forward(mup):
  """Same tokens as re-running the model on the growing sequence; the prefill's and every decode
  step's logits are the full forward's at that position (to float32 reassociation)."""
  graphdef, params, cfg = tiny(mup=mup)
  assert (cfg.embed_multiplier, cfg.attention_scale) == ((10.0, 1 / 16) if mup else (1.0, 1 / 4))
  tokens = gen.generate(graphdef, params, cfg, PROMPT, NEW)
  assert len(tokens) == NEW and len(set(tokens)) > 5  # not a degenerate repeat
  np.testing.assert_array_equal(tokens, gen.greedy_uncached(graphdef, params, cfg, PROMPT, NEW))

  seq = np.concatenate([PROMPT, tokens])
  full = full_logits(graphdef, params, cfg, seq)
  decoder = gen.cached_decoder(graphdef, cfg, gen.cache_len(cfg, len(seq)), None)

  def close(got, pos):  # atol for the logits near zero, where a relative error means nothing
    np.testing.assert_allclose(
      np.asarray(got)[0],
      full[pos],
      rtol=1e-5,
      atol=1e-5 * np.abs(full[pos]).max(),
      err_msg=f"position {pos}",
    )

  logits, cache = decoder.prefill(params, PROMPT[None])
  close(logits, len(PROMPT) - 1)
  for pos in range(len(PROMPT), len(seq) - 1):
    logits, cache = decoder.step(
      params, cache, seq[None, pos : pos + 1].astype(np.int32), np.int32(pos)
    )
    close(logits, pos)


@pytest.mark.parametrize("layout", ["tp", "fsdp"])
def test_sharded_greedy_equals_single(layout):
  """8 devices: tp splits heads (and so the cache) over tensor, fsdp splits the weights along
  d_model. Same tokens as one device."""
  graphdef, params, cfg = tiny(n_heads=8)
  mesh = config_lib.base_config().mesh
  mesh.layout = layout
  sharded = layouts.make_layout(mesh)
  assert sharded.mesh.size == 8
  ref = gen.generate(graphdef, params, cfg, PROMPT, NEW)
  np.testing.assert_array_equal(
    gen.generate(graphdef, params, cfg, PROMPT, NEW, layout=sharded), ref
  )
  decoding = gen.decoding_layout(sharded)
  placed = gen.place(params, cfg, decoding)
  fc = placed["blocks"]["mlp"]["fc_kernel"][
    ...
  ]  # [layers, embed, mlp]: mlp on tensor, embed on fsdp
  assert fc.sharding.shard_shape(fc.shape) == ((2, 64, 32) if layout == "tp" else (2, 8, 256))
  _, cache = gen.cached_decoder(graphdef, cfg, 32, decoding).prefill(placed, PROMPT[None])
  heads_split = 8 if layout == "tp" else 1
  assert cache.keys.sharding.shard_shape(cache.keys.shape) == (2, 1, 32, 8 // heads_split, 8)


def test_decode_step_costs_one_token(model):
  """The compiled decode step's matmul FLOPs are one token's: 2 x the blocks' matrices, attention
  against the max_len cache slots (scores and values, 2 x 2 max_len d per layer) and the head over
  the padded vocabulary. The prefill's are the prompt's tokens' (head on its last position only)."""
  graphdef, params, cfg = model
  d, f, layers, vocab = cfg.d_model, cfg.d_ff, cfg.n_layers, model_lib.padded_vocab(cfg)
  max_len, prompt_len = 64, 40
  decoder = gen.make_decoder(graphdef, cfg, max_len)
  tokens = np.zeros((1, prompt_len), np.int32)
  _, cache = jax.eval_shape(decoder.prefill, params, tokens)

  def flops(tokens_per_row):
    blocks = 2 * (4 * d * d + 2 * d * f) + 4 * max_len * d
    return layers * blocks * tokens_per_row + 2 * d * vocab

  step = decoder.step.lower(params, cache, tokens[:, :1], np.int32(prompt_len)).compile()
  prefill = decoder.prefill.lower(params, tokens).compile()
  assert analysis.dot_flops(step.as_text()) == flops(1)
  assert analysis.dot_flops(prefill.as_text()) == flops(prompt_len)
  assert flops(prompt_len) > 30 * flops(1)


def test_sampling(model):
  """top_k=1 and a tiny top_p are greedy; a seed fixes the tokens and another seed changes them;
  hot sampling still only draws real vocabulary ids (the table is padded to 128 rows)."""
  graphdef, params, cfg = model
  greedy = gen.generate(graphdef, params, cfg, PROMPT, NEW)
  sample = lambda **kw: gen.generate(graphdef, params, cfg, PROMPT, NEW, method="sample", **kw)
  np.testing.assert_array_equal(sample(top_k=1, seed=3), greedy)
  np.testing.assert_array_equal(sample(top_p=1e-6, seed=3), greedy)
  np.testing.assert_array_equal(sample(temperature=0.0), greedy)
  first = sample(seed=0)
  np.testing.assert_array_equal(sample(seed=0), first)
  assert not np.array_equal(sample(seed=1), first)
  hot = sample(temperature=100.0, seed=2)
  assert hot.max() < cfg.vocab_size and len(set(hot)) > NEW // 2


@pytest.mark.parametrize(
  "top_k,top_p,kept",
  [
    (0, 1.0, {0, 1, 2, 3}),
    (1, 1.0, {1}),
    (2, 1.0, {1, 3}),
    (0, 0.45, {1}),
    (0, 0.75, {1, 3}),  # 0.5 is below 0.75: the 0.3 token is needed to reach it
    (0, 0.85, {0, 1, 3}),
    (3, 0.6, {1, 3}),
    (2, 0.6, {1}),  # after top-k the best holds 0.5 / 0.8 = 0.625 >= 0.6 on its own
  ],
)
def test_filter_logits_keeps_the_expected_tokens(top_k, top_p, kept):
  probs = np.array([0.15, 0.5, 0.05, 0.3])
  logits = np.log(np.stack([probs, probs[::-1]])).astype(np.float32)
  out = np.asarray(gen.filter_logits(logits, top_k, top_p))
  assert set(np.flatnonzero(np.isfinite(out[0]))) == kept
  assert set(np.flatnonzero(np.isfinite(out[1]))) == {3 - i for i in kept}
  np.testing.assert_array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])


def test_one_beam_is_greedy(model):
  graphdef, params, cfg = model
  np.testing.assert_array_equal(
    gen.generate(graphdef, params, cfg, PROMPT, NEW, method="beam", num_beams=1),
    gen.generate(graphdef, params, cfg, PROMPT, NEW),
  )


def test_beam_search_finds_the_exhaustive_best():
  """5 tokens, 3 new: 25 beams keep every 2-token prefix, so the search scores all 125 sequences.
  With length_penalty 0 its pick is the most probable continuation, which greedy misses here."""
  graphdef, params, cfg = tiny(vocab_size=5)
  prompt, new = np.array([4, 2, 1]), 3  # greedy starts with 3, the best sequence with 4
  continuations = np.array(list(itertools.product(range(5), repeat=new)))
  seqs = np.concatenate([np.tile(prompt, (len(continuations), 1)), continuations], axis=1)
  logits = np.asarray(nnx.merge(graphdef, params)(seqs), np.float64)[:, len(prompt) - 1 : -1, :5]
  logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  scores = np.take_along_axis(logprobs, continuations[..., None], -1).sum((1, 2))
  best = continuations[np.argmax(scores)]
  beam = gen.generate(
    graphdef, params, cfg, prompt, new, method="beam", num_beams=25, length_penalty=0.0
  )
  np.testing.assert_array_equal(beam, best)
  assert not np.array_equal(gen.generate(graphdef, params, cfg, prompt, new), best)


def test_eos_ends_decoding(model):
  graphdef, params, cfg = model
  greedy = gen.generate(graphdef, params, cfg, PROMPT, NEW)
  eos = int(greedy[3])
  stop = list(greedy).index(eos) + 1
  np.testing.assert_array_equal(
    gen.generate(graphdef, params, cfg, PROMPT, NEW, eos_id=eos), greedy[:stop]
  )
  beam = gen.generate(graphdef, params, cfg, PROMPT, NEW, method="beam", eos_id=eos)
  assert eos not in beam[:-1]


def test_no_repeat_ngram(model):
  """HF's rule on a hand-made sequence; then the model's greedy output repeats bigrams, and with
  no_repeat_ngram_size=2 neither greedy, sampling nor beam search repeats one (prompt included)."""
  assert gen.banned_tokens([1, 2, 3, 1, 2], 3) == [3]
  assert gen.banned_tokens([1, 2, 3, 1, 2], 2) == [3]
  assert sorted(gen.banned_tokens([1, 2, 3, 1, 2], 1)) == [1, 1, 2, 2, 3]
  assert gen.banned_tokens([1, 2], 4) == [] and gen.banned_tokens([1, 2], 0) == []
  graphdef, params, cfg = model
  greedy = gen.generate(graphdef, params, cfg, PROMPT, NEW)
  assert has_repeated_ngram(np.concatenate([PROMPT, greedy]), 2)
  for method in gen.METHODS:
    tokens = gen.generate(graphdef, params, cfg, PROMPT, NEW, method=method, no_repeat_ngram_size=2)
    assert len(tokens) == NEW, method
    assert not has_repeated_ngram(np.concatenate([PROMPT, tokens]), 2), method


@pytest.mark.parametrize(
  "prompt,new,options,message",
  [
    ([], 4, {}, "non-empty 1-D"),
    ([[1, 2]], 4, {}, "non-empty 1-D"),
    ([1, 65], 4, {}, "[0, 65)"),
    ([1, -1], 4, {}, "[0, 65)"),
    ([1, 2], 0, {}, "max_new_tokens=0"),
    (list(range(60)), 5, {}, "longer than the model's 64 positions"),
    ([1], 4, {"method": "topk"}, "unknown method"),
    ([1], 4, {"temperature": -1.0}, "temperature=-1.0"),
    ([1], 4, {"top_k": -1}, "top_k=-1"),
    ([1], 4, {"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
    ([1], 4, {"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
    ([1], 4, {"num_beams": 0}, "num_beams=0"),
    ([1], 4, {"no_repeat_ngram_size": -2}, "no_repeat_ngram_size=-2"),
    ([1], 4, {"eos_id": 65}, "eos_id=65"),
  ],
)
def test_bad_input_is_an_input_error(model, prompt, new, options, message):
  graphdef, params, cfg = model
  with pytest.raises(InputError) as error:
    gen.generate(graphdef, params, cfg, np.array(prompt, np.int32), new, **options)
  assert message in str(error.value)
