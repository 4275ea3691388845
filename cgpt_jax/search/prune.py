"""Cheap, analytic pruning of the search space: what cannot be laid out (divisibility), what cannot
fit (costs/memory.py's model against the budget, with a margin), and what another candidate beats
on every count (dominance). Every pruned candidate keeps its reason."""

import dataclasses
import itertools

import ml_collections

from cgpt_jax import model as model_lib
from cgpt_jax import presets
from cgpt_jax.costs import analysis, memory
from cgpt_jax.parallel import layouts, pipeline_1f1b
from cgpt_jax.search.space import Candidate

# A candidate is pruned for memory only when the analytic estimate exceeds the budget by this
# factor: the estimate is the low end of what XLA keeps (memory.layer_activation_bytes_per_token),
# and the margin covers the rest, so no candidate that would fit is dropped (tests/test_search.py
# holds every compiled tiny candidate's estimate / compiled under it).
MEMORY_MARGIN = 1.3
KEEP_FITTING_K = 2  # gradient-accumulation choices kept per twin group: the fewest that fit, + 1


@dataclasses.dataclass(frozen=True)
class Shape:
  """What pruning reads of the resolved config."""

  model: ml_collections.ConfigDict
  seq_len: int
  batch: int
  eval_batch: int
  padded_vocab: int
  params_held: int  # stored parameters, the embedding's padding rows included

  @classmethod
  def of(cls, cfg: ml_collections.ConfigDict) -> "Shape":
    m = cfg.model
    v = model_lib.padded_vocab(m)
    held = presets.closed_form_params(m.n_layers, m.d_model, v, m.n_positions, d_ff=m.d_ff)
    return cls(m, cfg.data.seq_len, cfg.data.global_batch, cfg.data.eval_batch, v, held)


def _splits_moments(c: Candidate) -> bool:
  """The candidate's layout splits the optimizer state over devices holding the parameters whole
  (ZeRO-1): its preset has state rules of its own (Layout.zero1, before any layout is built)."""
  return bool(layouts.LAYOUT_PRESETS[c.layout].state_rules)


def _first(checks) -> str | None:
  return next((why for bad, why in checks if bad), None)


def divisibility(c: Candidate, s: Shape) -> str | None:
  """Why the candidate cannot be laid out, or None. The cheap mirror of what setup.build refuses
  (heads, d_ff, vocab and d_model over their axes, batch over the batch axes and microbatches,
  layers over stages x repeats, the sequence over pipe and context)."""
  z, m = c.sizes, s.model
  y, shards, stages = z["tensor"], z["data"] * z["fsdp"], z["pipe"]
  micro = s.batch // c.grad_accum if s.batch % c.grad_accum == 0 else 0
  return _first(
    [
      (m.n_heads % y, f"divisibility: {m.n_heads} heads over tensor={y}"),
      (m.d_ff % y, f"divisibility: d_ff={m.d_ff} over tensor={y}"),
      (s.padded_vocab % y, f"divisibility: vocab {s.padded_vocab} over tensor={y}"),
      (m.d_model % z["fsdp"], f"divisibility: d_model={m.d_model} over fsdp={z['fsdp']}"),
      (s.batch % (shards * c.grad_accum), f"divisibility: batch {s.batch} over {shards} shards"),
      (s.eval_batch % shards, f"divisibility: eval batch {s.eval_batch} over {shards} shards"),
      (
        _splits_moments(c) and (s.padded_vocab % z["data"] or m.d_model % z["data"]),
        f"divisibility: zero1 moments (vocab, d_model) over data={z['data']}",
      ),
      (s.seq_len % (2 * z["context"]), f"divisibility: seq {s.seq_len} over 2 x context"),
      (
        c.layout == "sp" and s.seq_len % (y * stages * z["context"]),
        f"divisibility: seq {s.seq_len} over sp tensor={y}",
      ),
      (m.n_layers % (stages * c.repeats), f"divisibility: {m.n_layers} layers over pipe x R"),
      (s.seq_len % stages, f"divisibility: seq {s.seq_len} over pipe={stages}"),
      (
        stages > 1
        and (micro % (c.microbatches * shards) or s.eval_batch % (c.microbatches * shards)),
        f"divisibility: micro-batch over M={c.microbatches} x {shards} shards",
      ),
    ]
  )


def memory_estimate(c: Candidate, s: Shape) -> dict:
  """Per-device bytes by the analytic model: the state (analysis.analytic_state_bytes), the float32
  gradients of the parameters held, and one micro-step's activations: the blocks' kept bytes
  (memory.layer_activation_bytes_per_token) for the stage's layers and the microbatches in flight
  (all M under the SPMD schedules, whose loop keeps every iteration's input; at least S under the
  hand-written ones), and the head's logits over the device's part of the sequence."""
  z, m = c.sizes, s.model
  state = analysis.analytic_state_bytes(z, m, s.params_held, s.padded_vocab, _splits_moments(c))
  held = analysis.analytic_state_bytes(z, m, s.params_held, s.padded_vocab, False)
  grads = held * memory.GRAD_BYTES / memory.STATE_BYTES_PER_PARAM
  rows = s.batch / (z["data"] * z["fsdp"] * c.grad_accum)
  tokens = rows * s.seq_len / z["context"]
  in_flight = 1.0
  if c.schedule in pipeline_1f1b.SCHEDULES:
    in_flight = min(c.microbatches, z["pipe"]) / c.microbatches
  block = memory.layer_activation_bytes_per_token(
    c.remat, m.d_model, m.d_ff, m.n_heads, s.seq_len, z["tensor"], c.layout == "sp"
  )
  layers = tokens * m.n_layers / z["pipe"] * in_flight * block
  logits = tokens / z["pipe"] * memory.logits_bytes_per_token(s.padded_vocab, z["tensor"])
  total = state + grads + layers + logits
  return {"state": state, "grads": grads, "activations": layers + logits, "total": total}


def _twin(c: Candidate, **change) -> str:
  return dataclasses.replace(c, **change).name


def dominated(c: Candidate) -> str | None:
  """Knobs a twin beats on every count: float32 compute (its bfloat16 twin keeps and moves no more
  bytes and runs at the bf16 peak), dp's replicated moments on a data-only mesh (ZeRO-1 moves the
  same bytes and keeps 1/n of them)."""
  if c.dtype == "float32":
    return f"dominated by {_twin(c, dtype='bfloat16')}: bf16 compute, no more bytes"
  z = c.sizes
  if c.layout == "3d" and z["data"] > 1 and all(z[a] == 1 for a in ("fsdp", "tensor", "pipe")):
    return f"dominated by {_twin(c, layout='zero1')}: same bytes, 1/data of the moments"
  return None


def _without_k(c: Candidate) -> Candidate:
  """The candidate's knobs but gradient accumulation: its twins share it."""
  return dataclasses.replace(c, grad_accum=0)


def prune(candidates: list[Candidate], s: Shape, budget: float) -> tuple[list, dict, dict]:
  """(survivors, {name: why pruned}, {name: memory estimate}). Of candidates that differ only in
  gradient accumulation, the KEEP_FITTING_K fewest micro-steps that fit are kept: more only cost
  time (weight passes, smaller matmuls)."""
  why, estimates, fitting = {}, {}, []
  for c in candidates:
    reason = divisibility(c, s)
    if reason is None:
      estimates[c.name] = memory_estimate(c, s)
      total = estimates[c.name]["total"]
      if total > budget * MEMORY_MARGIN:
        reason = f"memory: analytic {total / 1e9:.1f} GB > budget x {MEMORY_MARGIN}"
      else:
        reason = dominated(c)
    if reason is None:
      fitting.append(c)
    else:
      why[c.name] = reason
  survivors = []
  for _, twins in itertools.groupby(
    sorted(fitting, key=lambda c: (repr(_without_k(c)), c.grad_accum)), _without_k
  ):
    twins = list(twins)
    survivors += twins[:KEEP_FITTING_K]
    for c in twins[KEEP_FITTING_K:]:
      why[c.name] = f"dominated by {twins[0].name}: fewer micro-steps, and it fits"
  return survivors, why, estimates
