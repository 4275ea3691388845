"""Cerebras-GPT in Flax NNX: the GPT-2 graph with GPT-3 shapes (docs/cerebras_gpt.md#architecture).

Pre-LN blocks and a final LN (eps 1e-5), exact GELU, learned absolute positions, token embedding
tied to the output head (no head bias), biases on QKV / attention-out / both MLP linears, dense
causal attention in every layer, no dropout (Cerebras trains with dropout 0, so there is no RNG in
the step).

Every parameter carries logical axis names (`out_sharding` metadata) and the layer stack has a
leading `layers` axis, so `layouts.Layout` can shard any of them without the model knowing about
devices. The blocks are created with `nnx.vmap` and applied with `lax.scan`: compile time stays
flat in depth.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax import loss
from cgpt_jax.parallel import context
from cgpt_jax.parallel.layouts import (
  constrain,
  tensor_region,
  vocab_logits,
  vocab_lookup,
)
from cgpt_jax.parallel.spmd import keep_all_but_gathered

# Parameters keep only logical names; Layout turns them into shardings at jit time. Without this,
# flax would try to place each variable on a mesh the moment it is created.
nnx.use_eager_sharding(False)


# Standard deviation of a unit normal truncated to [-2, 2]: Cerebras' "std 0.02" draws have std
# 0.0176.
TRUNCATED_STD_RATIO = math.sqrt(
  1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(math.sqrt(2))
)


def _trunc_normal(std: float):
  # Cerebras (like torch's trunc_normal_(std, a=-2std, b=2std)) cuts at two standard deviations and
  # does not rescale: exactly jax's truncated_normal with its default bounds.
  return jax.nn.initializers.truncated_normal(stddev=std)


def _param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def _zeros(shape, names) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)


class LayerNorm(nnx.Module):
  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
    self.bias = _zeros((d,), ("embed",))
    self.eps = eps

  def __call__(self, x):
    # In float32 whatever the compute dtype: a bf16 variance loses the small differences it is
    # about.
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention. QKV is one [embed, 3, heads, head_dim] kernel so that splitting
  `heads` over a tensor axis splits q, k and v alike (Megatron's column-parallel QKV)."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.n_heads
    dh = d // h
    self.qkv_kernel = _param(
      rngs, _trunc_normal(cfg.hidden_init_std), (d, 3, h, dh), ("embed", None, "heads", "head_dim")
    )
    self.qkv_bias = _zeros((3, h, dh), (None, "heads", "head_dim"))
    self.out_kernel = _param(
      rngs, _trunc_normal(cfg.residual_init_std), (h, dh, d), ("heads", "head_dim", "embed")
    )
    self.out_bias = _zeros((d,), ("embed",))
    self.scale = cfg.attention_scale  # 1/sqrt(d_head); muP: 1/d_head

  def __call__(self, x):
    return self.mix(x) + self.output_bias()

  def mix(self, x):
    """Attention without its output bias: under tensor parallelism each device's heads give a
    partial sum of this, reduced over `tensor` (layouts.tensor_region)."""
    q, k, v = self.project(x)
    if context.ways() > 1:  # x is this device's chunks of the sequence: the rest are on the ring
      return self.project_out(context.ring_attention(q, k, v, self.scale))
    t = x.shape[1]
    return self.attend(q, k, v, jnp.tril(jnp.ones((t, t), bool)))

  def output_bias(self):
    return self.out_bias[...]

  def cached(self, x, cache, start):
    """Attention for x [batch, t, embed] at positions start.. start+t-1 against a key/value cache.

    `cache` is (keys, values), each [batch, max_len, heads, head_dim] holding positions < start; x's
    own keys and values are written in at `start` and the new cache is returned with the output.
    Each query sees the cache up to its own position: the slots past it are stale or empty.
    """
    q, k, v = self.project(x)
    keys, values = (
      jax.lax.dynamic_update_slice_in_dim(c, a, start, axis=1) for c, a in zip(cache, (k, v))
    )
    keys, values = (constrain(c, ("batch", "seq", "heads", "head_dim")) for c in (keys, values))
    visible = jnp.arange(keys.shape[1]) <= start + jnp.arange(x.shape[1])[:, None]
    return self.attend(q, keys, values, visible) + self.output_bias(), (keys, values)

  def project(self, x):
    """x [batch, seq, embed] -> q, k, v, each [batch, seq, heads, head_dim]."""
    qkv = jnp.einsum("btd,dkhe->kbthe", x, self.qkv_kernel[...])
    qkv = qkv + self.qkv_bias[...][:, None, None]
    return tuple(constrain(a, ("batch", "seq", "heads", "head_dim")) for a in qkv)

  def attend(self, q, k, v, mask):
    """Queries [batch, q_len, heads, head_dim] against keys and values [batch, k_len, ...] where
    mask [q_len, k_len] allows, then the out-projection (no bias): [batch, q_len, embed]."""
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    if q.dtype == jnp.float32:
      probs = jax.nn.softmax(scores, axis=-1)
    else:
      probs = softmax_keeping(scores, q.dtype)
    return self.project_out(jnp.einsum("bhqk,bkhe->bqhe", probs, v))

  def project_out(self, ctx):
    """The heads' context [batch, q_len, heads, head_dim] -> [batch, q_len, embed] (no bias)."""
    return jnp.einsum("bqhe,hed->bqd", ctx, self.out_kernel[...])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_keeping(scores: jax.Array, dtype) -> jax.Array:
  """Softmax over the last axis computed in float32, returned (and kept for the backward) in
  `dtype`. Differentiating jax.nn.softmax would keep its float32 output, [batch, heads, T, T] per
  layer, the largest activation of a bf16 run; as Megatron's fused softmax, keep the bf16 copy."""
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_keeping_fwd(scores, dtype):
  probs = softmax_keeping(scores, dtype)
  return probs, probs


def _softmax_keeping_bwd(dtype, probs, g):
  p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_keeping.defvjp(_softmax_keeping_fwd, _softmax_keeping_bwd)


class MLP(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    self.fc_kernel = _param(rngs, _trunc_normal(cfg.hidden_init_std), (d, f), ("embed", "mlp"))
    self.fc_bias = _zeros((f,), ("mlp",))
    self.proj_kernel = _param(rngs, _trunc_normal(cfg.residual_init_std), (f, d), ("mlp", "embed"))
    self.proj_bias = _zeros((d,), ("embed",))

  def __call__(self, x):
    return self.mix(x) + self.output_bias()

  def mix(self, x):
    """The MLP without its output bias (a partial sum under tensor parallelism, as
    Attention.mix)."""
    h = jax.nn.gelu(x @ self.fc_kernel[...] + self.fc_bias[...], approximate=False)
    h = constrain(h, ("batch", "seq", "mlp"))
    return h @ self.proj_kernel[...]

  def output_bias(self):
    return self.proj_bias[...]


class Block(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
    self.attn = Attention(cfg, rngs)
    self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x):
    # Named scopes tag the compiled ops for benchmarks/step_profile.py's breakdown of a step.
    with jax.named_scope("attention"):
      x = x + tensor_region(self.attn, self.ln1(x))
    with jax.named_scope("mlp"):
      x = x + tensor_region(self.mlp, self.ln2(x))
    # Between blocks the residual stream may be split along the sequence as well (sequence
    # parallelism): a name of its own, so attention and the MLP keep the whole sequence.
    return constrain(x, ("batch", "residual_seq", "embed"))

  def cached(self, x, cache, start):
    """The block for x at positions start.. against the layer's key/value cache (Attention.cached):
    (output, new cache)."""
    attn, cache = self.attn.cached(self.ln1(x), cache, start)
    x = x + attn
    x = x + self.mlp(self.ln2(x))
    return constrain(x, ("batch", "residual_seq", "embed")), cache


@jax.custom_vjp
def grad_barrier(x):
  """Identity whose gradient passes through an optimization barrier.

  On CPU, XLA otherwise re-derives the residual-stream gradient several times across the unrolled
  layers. Without the barrier at each block input the default experiment's step took 1.30-1.41x
  as long (benchmarks/shakespeare_char.py; docs/speed.md#cpu-levers).
  """
  return x


grad_barrier.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


class GPT(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.cfg = cfg
    # The table has padded_vocab(cfg) rows so that it splits evenly over a tensor axis; the rows
    # past the real vocabulary start at zero, are never looked up and are masked out of the logits,
    # so they never get a gradient and the real rows are the same values as without padding.
    real = _trunc_normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32)
    pad = jnp.zeros((padded_vocab(cfg) - cfg.vocab_size, cfg.d_model), jnp.float32)
    self.wte = nnx.Param(jnp.concatenate([real, pad]), out_sharding=("vocab", "embed"))
    self.wpe = _param(
      rngs, _trunc_normal(cfg.init_std), (cfg.n_positions, cfg.d_model), (None, "embed")
    )

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.ln_f = LayerNorm(cfg.d_model, cfg.ln_eps)

  def __call__(self, tokens: jax.Array, run_blocks=None, start: jax.Array | int = 0) -> jax.Array:
    """tokens [batch, seq] int at positions start, start + 1, ... (or at positions `start` [seq],
    GPT.embed) -> logits [batch, seq, vocab] float32.

    `run_blocks(graphdef, stacked, x)` applies the layer stack; by default a scan over its leading
    `layers` axis. The pipeline passes its own schedule (pipeline.py).
    """
    return self.head(self.hidden(tokens, run_blocks, start))

  def token_nll(
    self, tokens: jax.Array, targets: jax.Array, run_blocks=None, start: jax.Array | int = 0
  ) -> jax.Array:
    """The next-token loss of each position [batch, seq] (token_nll), as __call__ runs the model."""
    return self.head_nll(self.hidden(tokens, run_blocks, start), targets)

  def hidden(self, tokens: jax.Array, run_blocks=None, start: jax.Array | int = 0) -> jax.Array:
    """The last block's output [batch, seq, embed]: everything before the head."""
    run_blocks = run_blocks or functools.partial(scan_blocks, self.cfg)
    with jax.named_scope("embed"):
      x = self.embed(tokens, start)
    return run_blocks(*nnx.split(self.blocks), x)

  def embed(self, tokens: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """tokens [batch, seq] at positions start, start + 1, ... (a traced start when decoding), or
    with `start` [seq] at those positions (a context-parallel device's chunks, context.py)."""
    if jnp.ndim(start):
      positions = jnp.take(self.wpe[...], start, axis=0)
    else:
      positions = jax.lax.dynamic_slice_in_dim(self.wpe[...], start, tokens.shape[1])
    # Whole on every device, as the table is: under sequence parallelism the rows' gradient, which
    # arrives split along the sequence, is then all-gathered before it is padded back to the table
    # (left to it, the partitioner reshards the padded table with collective-permutes as well).
    positions = constrain(positions, (None, "embed"))
    x = vocab_lookup(self.wte[...], tokens) + positions
    if self.cfg.embed_multiplier != 1:  # muP: 10
      x = x * jnp.asarray(self.cfg.embed_multiplier, x.dtype)
    return constrain(x, ("batch", "residual_seq", "embed"))

  def head(self, x: jax.Array) -> jax.Array:
    """Logits [batch, seq, vocab] of the last block's output, the padded vocabulary's at the
    lowest float (never sampled, no probability)."""
    logits = self.padded_logits(x)
    if logits.shape[-1] > self.cfg.vocab_size:
      real = jnp.arange(logits.shape[-1]) < self.cfg.vocab_size
      logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
    return logits

  def head_nll(self, x: jax.Array, targets: jax.Array) -> jax.Array:
    """loss.token_nll of the head's logits, the padding masked inside the loss's own passes rather
    than written out first (one pass over [batch, seq, vocab] less each way)."""
    return loss.token_nll(self.padded_logits(x), targets, self.cfg.vocab_size)

  def padded_logits(self, x: jax.Array) -> jax.Array:
    with jax.named_scope("head"):
      x = self.ln_f(x)
      if self.cfg.output_multiplier != 1:  # muP: logits / m, applied to the d-wide input (cheaper)
        x = x * jnp.asarray(self.cfg.output_multiplier, x.dtype)
      # Logits in float32 even from bf16 operands: the loss's logsumexp needs their small
      # differences.
      logits = vocab_logits(x, self.wte[...])
      return constrain(logits, ("batch", "seq", "vocab"))


def compute_dtype(path, dtype: str):
  """The dtype the forward uses the parameter at `path` (tree keys or their names) in: the compute
  dtype, except for the layer norms' (kept float32, like their arithmetic)."""
  if any(getattr(k, "key", k) in ("ln1", "ln2", "ln_f") for k in path):
    return jnp.float32
  return jnp.dtype(dtype)


def compute_params(params, dtype: str):
  """The parameters as the forward pass uses them: float32 master copies in their compute_dtype."""
  if dtype == "float32":
    return params
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x.astype(compute_dtype(path, dtype)), params
  )


REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


def rematerialise(f, policy: str, streams: bool = False):
  """f under a remat policy: "none" keeps every activation for the backward; "full" keeps only f's
  inputs and recomputes the rest; "dots" keeps every matmul output and recomputes only the
  elementwise work between them (no matmul FLOPs repeated). With `streams` (f gathers its weights,
  spmd.materialise) "none" still keeps every activation but not the gathered weights: the backward
  gathers them again, as FSDP and weight streaming do, instead of holding every layer's whole."""
  if policy == "none":
    if not streams:
      return f
    return jax.checkpoint(f, policy=keep_all_but_gathered)
  return jax.checkpoint(f, policy=REMAT_POLICIES[policy])


def scan_blocks(
  cfg: ml_collections.ConfigDict,
  graphdef,
  stacked,
  x: jax.Array,
  remat: str | None = None,
  load=None,
  streams: bool = False,
) -> jax.Array:
  """Applies the blocks stacked along the leading axis of `stacked` in order (a lax.scan), each
  under remat policy `remat` (default cfg.remat). `load(params)`, if given, turns a layer's slice
  of `stacked` into its weights inside the rematerialised step; `streams` says it gathers them."""

  def layer(x, params):
    if cfg.grad_barrier:
      x = grad_barrier(x)
    return nnx.merge(graphdef, load(params) if load else params)(x), None

  layer = rematerialise(layer, cfg.remat if remat is None else remat, streams)
  n = jax.tree.leaves(stacked)[0].shape[0]
  x, _ = jax.lax.scan(layer, x, stacked, unroll=min(cfg.scan_unroll, n))
  return x


def abstract_model(cfg: ml_collections.ConfigDict, seed: int = 0):
  """(graphdef, abstract params) of the model: shapes, dtypes and logical names, nothing
  allocated."""
  return nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed))))


def padded_vocab(cfg: ml_collections.ConfigDict) -> int:
  """Vocabulary rounded up to cfg.vocab_multiple (Megatron's make-vocab-size-divisible-by). A
  fixed multiple, not one per layout, so every layout has the same shapes (and checkpoints move
  freely)."""
  return -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


def count_params(abstract_params, cfg: ml_collections.ConfigDict) -> int:
  """Trainable parameters: every element, less the padding rows of the embedding table."""
  padding = (padded_vocab(cfg) - cfg.vocab_size) * cfg.d_model
  return sum(x.size for x in jax.tree.leaves(abstract_params)) - padding
