"""optax optimizers with the Cerebras-GPT recipe, everything from config.

Clip the global gradient norm, then AdamW (beta=(0.9, 0.95), eps 1e-8 or 1e-9 for the biggest
models) or Adafactor, with weight decay on weight matrices and embeddings only, driven by a linear
warm-up followed by a linear or cosine decay to `final_lr_fraction` of the peak at the last step
(docs/cerebras_gpt.md#training-recipe). Under muP the hidden matrices' step is scaled by
`hidden_lr_multiplier` (1/m) with a labelled optax.multi_transform, so their Adam LR is base LR / m
(docs/mup.md#the-rules).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Leaves that get weight decay. Named rather than "ndim >= 2" because stacked layer norms and
# biases are 2-D once the `layers` axis is prepended.
DECAYED = ("wte", "wpe", "qkv_kernel", "out_kernel", "fc_kernel", "proj_kernel")
# muP's "hidden" weights: the matrices whose both dimensions grow with width (embeddings do not).
HIDDEN = ("qkv_kernel", "out_kernel", "fc_kernel", "proj_kernel")


def lr_schedule(o: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Learning rate per optimizer step: 0 -> peak over warmup_steps, then down to the final value.
  Adafactor's relative step instead: min(lr, 1/sqrt(t)) (Shazeer & Stern 2018, §8, lr = 1e-2)."""
  if o.name == "adafactor" and o.adafactor.relative_step:
    return lambda count: jnp.minimum(o.lr, jax.lax.rsqrt(count + 1.0))
  peak, final = o.lr, o.lr * o.final_lr_fraction
  decay_steps = steps - o.warmup_steps
  if o.decay == "constant":
    after = optax.constant_schedule(peak)
  elif o.decay == "linear":
    after = optax.linear_schedule(peak, final, decay_steps)
  else:
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.final_lr_fraction)
  if o.warmup_steps == 0:
    return after
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, o.warmup_steps), after], [o.warmup_steps]
  )


def _named_any(names):
  def label(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) in names for k in path), params
    )

  return label


decay_mask = _named_any(DECAYED)


def factored_dims(shape, min_dim: int) -> tuple[int, int] | None:
  """(second largest, largest) axis of `shape`, over which Adafactor keeps its second moment as a
  column and a row mean, or None when the second largest is below min_dim. optax's rule, restated
  here because the state's shardings depend on which axes were reduced (tested against optax)."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim:
    return None
  return int(order[-2]), int(order[-1])


def _adafactor(o: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  a = o.adafactor
  # Decay scaled by the learning rate, as AdamW's, so optim.weight_decay means the same for both.
  decay = (lambda count: o.weight_decay * lr(count)) if o.weight_decay else None
  return optax.adafactor(
    lr,
    min_dim_size_to_factor=a.factor_min_dim,
    decay_rate=a.decay_rate,
    multiply_by_parameter_scale=a.parameter_scale,
    clipping_threshold=a.clip_threshold or None,
    momentum=a.momentum or None,
    weight_decay_rate=decay,
    factored=a.factored,
    weight_decay_mask=decay_mask,
  )


def make_optimizer(
  o: ml_collections.ConfigDict, steps: int, hidden_lr_multiplier: float = 1.0
) -> optax.GradientTransformation:
  lr = lr_schedule(o, steps)
  if o.name == "adafactor":
    base = _adafactor(o, lr)
  else:
    base = optax.adamw(
      lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
  parts = [optax.clip_by_global_norm(o.clip_norm), base]
  if hidden_lr_multiplier != 1:
    # Stateless, so the optimizer state is the same tree as without muP.
    labels = lambda params: jax.tree.map(
      lambda h: "hidden" if h else "base", _named_any(HIDDEN)(params)
    )
    parts.append(
      optax.multi_transform(
        {"hidden": optax.scale(hidden_lr_multiplier), "base": optax.identity()}, labels
      )
    )
  return optax.chain(*parts)
