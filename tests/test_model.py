"""The model's shapes, parameter counts, logical names and init rules, from abstract shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import PAPER_PARAMS

from cgpt_jax import config as config_lib
from cgpt_jax import loss, presets
from cgpt_jax import model as model_lib


def model_cfg(preset, **overrides):
  c = config_lib.base_config().model
  c.preset = preset
  c.vocab_size = 50257
  c.update(overrides)
  config_lib.resolve_model(c)
  return c


@pytest.mark.parametrize("size", list(PAPER_PARAMS))
def test_param_count_matches_paper(size):
  _, abstract = model_lib.abstract_model(model_cfg(size))
  assert all(
    isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract)
  )  # nothing allocated
  assert model_lib.count_params(abstract, model_cfg(size)) == PAPER_PARAMS[size]
  assert abstract["wte"].shape == (50304, model_cfg(size).d_model)  # padded to a multiple of 128
  p = presets.CEREBRAS_GPT[size]
  assert presets.closed_form_params(p.n_layers, p.d_model) == PAPER_PARAMS[size]


def test_every_parameter_has_logical_names():
  _, abstract = model_lib.abstract_model(model_cfg("tiny"))
  specs = nnx.get_partition_spec(abstract)
  flat = dict(
    jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]
  )
  by_name = {jax.tree_util.keystr(k): tuple(v) for k, v in flat.items()}
  shapes = {
    jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  assert by_name.keys() == shapes.keys()
  for name, spec in by_name.items():
    assert len(spec) == len(shapes[name]), name
    if "blocks" in name:
      assert spec[0] == "layers", name  # stacked for the scan
  assert by_name["['wte'].value"] == ("vocab", "embed")
  assert by_name["['blocks']['attn']['qkv_kernel'].value"] == (
    "layers",
    "embed",
    None,
    "heads",
    "head_dim",
  )
  assert by_name["['blocks']['mlp']['fc_kernel'].value"] == ("layers", "embed", "mlp")


def test_init_follows_cerebras_rules():
  """std 0.02 truncated at 2 std, residual projections 0.02/sqrt(2L), biases 0, LN scale 1."""
  cfg = model_cfg("", n_layers=8, d_model=256, n_heads=4, n_positions=128, vocab_size=512)
  m = model_lib.GPT(cfg, rngs=nnx.Rngs(0))
  std = 0.02
  trunc_std = std * 0.8796  # std of a unit normal truncated to [-2, 2] (tables of the normal law)
  assert model_lib.TRUNCATED_STD_RATIO == pytest.approx(0.8796, abs=1e-4)
  wte = np.asarray(m.wte[...])
  assert np.abs(wte).max() <= 2 * std + 1e-7
  np.testing.assert_allclose(wte.std(), trunc_std, rtol=0.02)
  res = np.asarray(m.blocks.mlp.proj_kernel[...])
  np.testing.assert_allclose(res.std(), trunc_std / np.sqrt(2 * 8), rtol=0.02)
  assert cfg.residual_init_std == pytest.approx(0.02 / 4)
  assert not np.asarray(m.blocks.attn.qkv_bias[...]).any()
  assert (np.asarray(m.blocks.ln1.scale[...]) == 1).all()
  assert model_cfg("1.3b").residual_init_std == 0.0025


def test_forward_is_causal_and_scan_matches_unrolled():
  cfg = model_cfg("tiny", vocab_size=97, n_positions=32)
  m = model_lib.GPT(cfg, rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 97)
  logits = m(tokens)
  assert logits.shape == (2, 16, 128) and logits.dtype == jnp.float32  # vocab padded to 128
  assert (logits[..., 97:] == jnp.finfo(jnp.float32).min).all()  # padding never predicted
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 97)
  np.testing.assert_array_equal(
    m(changed)[:, :10], logits[:, :10]
  )  # the past never sees the future
  cfg_unrolled = model_cfg("tiny", vocab_size=97, n_positions=32, scan_unroll=2, grad_barrier=False)
  m2 = model_lib.GPT(cfg_unrolled, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(m2(tokens), logits, rtol=1e-5, atol=1e-5)


def test_full_remat_keeps_loss_and_gradients():
  cfg = model_cfg("tiny", vocab_size=61, n_positions=16)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 61)

  def loss_and_grad(c):
    graphdef, params = nnx.split(model_lib.GPT(c, rngs=nnx.Rngs(3)))
    f = lambda p: jnp.mean(loss.token_nll(nnx.merge(graphdef, p)(tokens[:, :-1]), tokens[:, 1:]))
    return jax.value_and_grad(f)(params)

  base = loss_and_grad(cfg)
  cfg.remat = "full"
  remat = loss_and_grad(cfg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), base, remat)


def test_bf16_softmax_has_softmax_gradient():
  """The bf16 attention softmax keeps its output in the compute dtype for the backward; in float32
  its value and gradient are jax.nn.softmax's."""
  scores = jax.random.normal(jax.random.key(0), (2, 3, 5, 7))
  weights = jax.random.normal(jax.random.key(1), scores.shape)

  def loss(softmax):
    return lambda s: jnp.sum(softmax(s) * weights)

  ours = lambda s: model_lib.softmax_keeping(s, jnp.float32)
  reference = lambda s: jax.nn.softmax(s, axis=-1)
  np.testing.assert_allclose(ours(scores), reference(scores), rtol=1e-6)
  np.testing.assert_allclose(
    jax.grad(loss(ours))(scores), jax.grad(loss(reference))(scores), rtol=1e-5, atol=1e-7
  )
  assert model_lib.softmax_keeping(scores, jnp.bfloat16).dtype == jnp.bfloat16
