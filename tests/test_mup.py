"""muP (docs/mup.md#the-rules): every multiplier is applied where the rules put it. Expected
values are the rules' own numbers (base width 256, std 0.08, x10, 1/m, 1/d_head), not the code's
output."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import experiment, tiny_config

from cgpt_jax import config as config_lib
from cgpt_jax import model as model_lib
from cgpt_jax import mup, presets
from cgpt_jax.train import setup

TRUNC = 0.8796  # std of a unit normal truncated to [-2, 2]


def model_cfg(width, is_mup=True, **overrides):
  c = config_lib.base_config().model
  c.update(
    n_layers=2,
    d_model=width,
    n_heads=width // 64,
    n_positions=64,
    vocab_size=512,
    mup=is_mup,
    **overrides,
  )
  config_lib.resolve_model(c)
  return c


def test_presets_carry_the_mup_rules():
  c = experiment("cerebras_gpt").get_config("111m-mup")
  assert c.optim.lr == 6e-3 and c.data.global_batch == 120
  config_lib.resolve_model(c.model)
  m = 768 / 256
  assert (c.model.n_layers, c.model.d_model, c.model.mup) == (10, 768, True)
  assert c.model.init_std == 0.08
  assert c.model.hidden_init_std == pytest.approx(0.08 / math.sqrt(m))
  assert c.model.residual_init_std == pytest.approx(0.08 / math.sqrt(2 * m * 10))
  assert c.model.embed_multiplier == 10
  assert c.model.output_multiplier == pytest.approx(1 / m)
  assert c.model.hidden_lr_multiplier == pytest.approx(1 / m)
  assert c.model.attention_scale == pytest.approx(1 / 64)
  assert set(presets.CEREBRAS_GPT_MUP) == {
    "111m-mup",
    "256m-mup",
    "590m-mup",
    "1.3b-mup",
    "2.7b-mup",
  }
  sp = model_cfg(768, is_mup=False)  # standard: none of it
  assert (sp.embed_multiplier, sp.output_multiplier, sp.hidden_lr_multiplier) == (1, 1, 1)
  assert sp.attention_scale == pytest.approx(1 / 8)


@pytest.mark.parametrize("width", [256, 1024])
def test_init_std_shrinks_with_width(width):
  """Hidden matrices 0.08/sqrt(m), residual projections 0.08/sqrt(2 m L), embeddings 0.08."""
  m = width / 256
  net = model_lib.GPT(model_cfg(width), rngs=nnx.Rngs(0))
  stds = {
    "wte": np.std(np.asarray(net.wte[...])[:512]),
    "qkv": np.std(np.asarray(net.blocks.attn.qkv_kernel[...])),
    "fc": np.std(np.asarray(net.blocks.mlp.fc_kernel[...])),
    "out": np.std(np.asarray(net.blocks.attn.out_kernel[...])),
    "proj": np.std(np.asarray(net.blocks.mlp.proj_kernel[...])),
  }
  hidden, residual = 0.08 / math.sqrt(m), 0.08 / math.sqrt(2 * m * 2)
  expected = {"wte": 0.08, "qkv": hidden, "fc": hidden, "out": residual, "proj": residual}
  for name, std in stds.items():
    assert std == pytest.approx(TRUNC * expected[name], rel=0.03), name


def test_forward_multipliers():
  """Same weights in a muP and a standard model of width 128 (m = 1/2): the embedding output is x10,
  the logits x1/m, and the attention equals a standard one whose queries are pre-divided by
  sqrt(d_head) (scores / d_head instead of / sqrt(d_head))."""
  width, m, d_head = 128, 0.5, 64
  mup_net = model_lib.GPT(model_cfg(width), rngs=nnx.Rngs(0))
  params = nnx.state(mup_net)
  sp_graphdef, _ = model_lib.abstract_model(model_cfg(width, is_mup=False))
  sp_net = nnx.merge(sp_graphdef, params)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 512)

  np.testing.assert_allclose(mup_net.embed(tokens), 10 * sp_net.embed(tokens), rtol=1e-6)
  x = jax.random.normal(jax.random.key(2), (2, 16, width))
  np.testing.assert_allclose(
    mup_net.head(x)[..., :512], sp_net.head(x)[..., :512] / m, rtol=1e-5, atol=1e-6
  )

  attn = jax.tree.map(lambda a: a[0], params["blocks"]["attn"])  # layer 0
  mup_attn = nnx.merge(nnx.graphdef(mup_net.blocks.attn), attn)
  scaled = dict(attn)
  q_scale = jnp.array([d_head**-0.5, 1.0, 1.0])  # only the queries
  scaled["qkv_kernel"] = attn["qkv_kernel"].replace(
    attn["qkv_kernel"][...] * q_scale[:, None, None]
  )
  scaled["qkv_bias"] = attn["qkv_bias"].replace(attn["qkv_bias"][...] * q_scale[:, None, None])
  sp_attn = nnx.merge(nnx.graphdef(sp_net.blocks.attn), nnx.State(scaled))
  np.testing.assert_allclose(mup_attn(x), sp_attn(x), rtol=1e-5, atol=1e-6)


def test_hidden_matrices_get_the_base_lr_over_m(shared_data, tmp_path):
  """First AdamW step, no decay: every weight moves by LR x g/(|g| + eps), i.e. by the LR of its
  group. Hidden matrices (QKV, attention out, MLP in/out) move by base/m; embeddings, biases and
  layer norms by the base LR. Width 512: m = 2."""
  c = tiny_config(shared_data, tmp_path, layout="single")
  c.model.update(d_model=512, n_heads=8, mup=True)
  c.optim.update(lr=6e-3, warmup_steps=0, decay="constant", weight_decay=0.0, clip_norm=1e9)
  s = setup.build(c, 65)
  params = setup.make_init(s)().params
  # Gradients of magnitude >= 1, so eps = 1e-8 changes nothing at float32 precision.
  grads = jax.tree.map(
    lambda p: jnp.where(jnp.arange(p.size).reshape(p.shape) % 2, 1.5, -2.0), params
  )
  updates, _ = s.tx.update(grads, s.tx.init(params), params)
  moved = {
    jax.tree_util.keystr(k): np.unique(np.abs(np.asarray(v)))
    for k, v in jax.tree_util.tree_flatten_with_path(updates)[0]
  }
  for name, sizes in moved.items():
    hidden = any(h in name for h in ("qkv_kernel", "out_kernel", "fc_kernel", "proj_kernel"))
    np.testing.assert_allclose(sizes, 6e-3 / 2 if hidden else 6e-3, rtol=1e-6, err_msg=name)


def test_activation_rms_reads_every_layer():
  net = model_lib.GPT(model_cfg(128), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 512)
  rms = mup.activation_rms(net, tokens)
  assert list(rms) == ["embedding", "block 1", "block 2", "logits"]
  x = net.embed(tokens)
  np.testing.assert_allclose(rms["embedding"], np.sqrt(np.mean(np.square(x))), rtol=1e-6)
  np.testing.assert_allclose(
    rms["logits"], np.sqrt(np.mean(np.square(net(tokens)[..., :512]))), rtol=1e-5
  )
