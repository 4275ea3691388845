"""optax AdamW with the Cerebras-GPT recipe, everything from config.

Clip the global gradient norm, then AdamW (beta=(0.9, 0.95), eps 1e-8 or 1e-9 for the biggest
models) with weight decay on weight matrices and embeddings only, driven by a linear warm-up followed
by a linear or cosine decay to `final_lr_fraction` of the peak at the last step (REFERENCE.md §1).
"""
import jax
import ml_collections
import optax

# Leaves that get weight decay. Named rather than "ndim >= 2" because stacked layer norms and
# biases are 2-D once the `layers` axis is prepended.
DECAYED = ("wte", "wpe", "qkv_kernel", "out_kernel", "fc_kernel", "proj_kernel")


def schedule(o: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Learning rate per optimizer step: 0 -> peak over warmup_steps, then down to the final value."""
  peak, final = o.lr, o.lr * o.final_lr_fraction
  decay_steps = steps - o.warmup_steps
  if o.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif o.schedule == "linear":
    after = optax.linear_schedule(peak, final, decay_steps)
  else:
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.final_lr_fraction)
  if o.warmup_steps == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, o.warmup_steps), after],
                              [o.warmup_steps])


def decay_mask(params):
  def is_decayed(path, _):
    return any(getattr(k, "key", None) in DECAYED for k in path)
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(o: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask),
  )
