"""Maximal update parameterisation (muP) as Cerebras-GPT-muP uses it (docs/mup.md).

Hyperparameters are tuned once at a base width (256) and transferred to width d by m = d / 256:
- embeddings: init std 0.08, base LR, output (token + position) x 10;
- hidden matrices (QKV, attention out, MLP in and out): init std 0.08/sqrt(m), Adam LR base/m
  (applied by optim.make_optimizer with a labelled optax.multi_transform);
- residual output projections: init std 0.08/sqrt(2 m L);
- logits x 1/m; attention scores / d_head instead of / sqrt(d_head);
- biases and layer norms: as standard, base LR.
Under these rules every layer's activations stay the same size as the model widens, during training
as well as at init; `activation_rms` measures that (benchmarks/coord_check.py).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

BASE_WIDTH = 256
BASE_LR = 6e-3  # decays to 6e-4 with the standard schedule shape
BASE_INIT_STD = 0.08
EMBED_MULTIPLIER = 10.0
STANDARD_INIT_STD = 0.02


def parameterisation(model: ml_collections.ConfigDict, big_residual_rule: bool = False) -> dict:
  """Init scales and multipliers for `model` (standard or muP by model.mup); model.init_std, when
  set, replaces the base std. `big_residual_rule`: Cerebras' fixed 0.0025 residual std (1.3B+)."""
  d_head = model.d_model // model.n_heads
  m = model.d_model / model.mup_base_width if model.mup else 1.0
  std = model.init_std or (BASE_INIT_STD if model.mup else STANDARD_INIT_STD)
  if model.mup:
    residual = std / math.sqrt(2 * m * model.n_layers)
  else:
    residual = 0.0025 if big_residual_rule else std / math.sqrt(2 * model.n_layers)
  return {
    "init_std": std,
    "hidden_init_std": std / math.sqrt(m),
    "residual_init_std": residual,
    "embed_multiplier": EMBED_MULTIPLIER if model.mup else 1.0,
    "output_multiplier": 1 / m,
    "attention_scale": 1 / d_head if model.mup else d_head**-0.5,
    "hidden_lr_multiplier": 1 / m,
  }


def activation_rms(model, tokens: jax.Array) -> dict[str, jax.Array]:
  """Root-mean-square of each layer's output on `tokens`: the embedding, every block, the logits.
  Blocks are applied one at a time (not scanned) so each output can be read."""
  x = model.embed(tokens)
  rms = {"embedding": jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))}
  graphdef, stacked = nnx.split(model.blocks)
  for i in range(model.cfg.n_layers):
    x = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))(x)
    rms[f"block {i + 1}"] = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
  logits = model.head(x)[..., : model.cfg.vocab_size]
  rms["logits"] = jnp.sqrt(jnp.mean(jnp.square(logits)))
  return rms
