"""The bytes each layout's algorithm moves per step and device, by cause: the formula beside the
HLO.

Every term is the algorithm spmd.py and the layouts' tables define, counted from shapes: nothing
here reads the compiled program. Conventions: per device and per optimizer step;
an all-reduce of V bytes over n devices sends 2 V (n-1)/n, an all-gather or reduce-scatter whose
whole result is V sends V (n-1)/n, a collective-permute V. k = train.grad_accum micro-steps.

Parameters, one term per cause, summed over the parameter tensors by where each is held (its spec)
and where its optimizer state is (its state spec):
- gradient_all_reduce: a gradient replicated over batch axes (data, fsdp) or the axes that split
  the sequence (pipe, context) is reduced once per step over them, after the micro-steps summed it
  locally: 2 V (n-1)/n of its float32 shard.
- gradient_reduce_scatter + parameter_all_gather (ZeRO-1): where the state is split over axes the
  parameter is not, the gradient is reduce-scattered instead, V (n-1)/n, and the updated parameter
  all-gathered back, V (n-1)/n.
- layer_weight_gather, layer_grad_scatter (ZeRO-3, the wafer): a layer weight split over fsdp is
  gathered, in the compute dtype, every time a layer runs, and its gradient reduce-scattered in
  float32 once per run. The backward gathers again the weights it multiplies by (the four
  matrices); under a remat policy ("full", and "dots", which keeps matmul outputs but not the
  layer norms and bias adds between them) it reruns the layer and gathers every weight again but
  the MLP-out bias, the rerun's last op, whose result the backward never needs (XLA drops it).
  In a pipeline a stage runs the same layers at every iteration, so its weights are gathered once
  per micro-step and their gradient scattered once (pipeline.make_run_blocks).
- head_weight_gather, head_grad_scatter: the embedding, positions and final norm, split over fsdp,
  gathered once per micro-step and kept for the head and the backward; gradient scattered once.
- scalars: the loss, summed over the devices that share the tokens; per parameter whose update
  runs split over any axis, two partial sums of squares of its gradient (gradient clipping, the
  logged norm) and one boolean: is its new value finite (train.keep_finite).
Activations, in the wire dtype: the compute dtype, but float32 on this CPU backend, whose compiler
moves 16-bit collectives as float32 (spmd.wire_dtype). `backend` picks which.
- tensor_layers: Megatron's all-reduce of the [tokens, d] activation after attention and after the
  MLP, and of their input gradients in the backward: 4 per layer run, each 2 V (Y-1)/Y. Full remat
  reruns the forward's two in the backward, less the unit's last (its result is dead:
  analysis.rerun_drops_last); "dots" keeps the matmul outputs, which the partitioner all-reduced.
- tensor_embedding_head: the vocab-parallel lookup (forward) and the head's input gradient
  (backward) on the device's tokens.
- tensor_cross_entropy: the vocab-parallel loss reduces three [tokens] partials over tensor (the
  logits' max and sum of exponentials for logsumexp, and the target's logit).
- Sequence parallelism (Megatron-SP, layouts.tensor_region) moves tp's tensor_layers and
  tensor_embedding_head bytes as all-gathers and reduce-scatters, half each: a region is entered
  with an all-gather of the sequence and left with a reduce-scatter (and each is the other's
  transpose in the backward), and under any remat policy the backward's rerun enters both regions
  and leaves them, less the unit's last exit; the vocab-parallel lookup is left with a
  reduce-scatter and the head entered with an all-gather. With the residual stream split along the
  sequence, the gradients of the layer norms and output biases (6 d per layer, 2 d for the final
  norm) are partial sums over tensor, all-reduced in every micro-step (sequence_norm_grads), and
  the gradient of the positions' rows the device embeds (T, or its T/S or T/N part of the
  sequence) comes out split along the sequence and is all-gathered before it joins the table
  (sequence_positions_grad, model.GPT.embed).
- pipeline_hops: one [mb, T, d] collective-permute per iteration forward and one backward.
- pipeline_entry, pipeline_exit: stage inputs all-gathered over pipe (whole sequences), outputs
  reduce-scattered back to sequence parts, and each one's transpose in the backward.
- context_kv_ring: context parallelism's ring attention (parallel/context.py). In every layer run
  each of the N devices sends its keys and values, [tokens, d/Y] each for its T/N of the sequence,
  N-1 hops round the ring: 2 (N-1)/N b T d/Y per layer, b the rows it holds. Under any remat
  policy the backward's rerun of the layer sends them round again ("dots" keeps matmul outputs, and
  a hop's is not one).
- context_kv_grad_ring: the backward's transpose of each hop sends the keys' and values'
  gradients one hop back: the same bytes again, per layer run.
The device's tokens in the activation terms are its rows' whole sequences, B T / X, or under
context parallelism its 1/N of them.
"""

import math
from typing import TYPE_CHECKING

import jax
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

from cgpt_jax import model as model_lib
from cgpt_jax.costs import analysis
from cgpt_jax.parallel import spmd
from cgpt_jax.parallel.layouts import Layout, is_spec

if TYPE_CHECKING:  # a type only: costs/ is below train/
  from cgpt_jax.train.setup import Setup

# Each cause: the collective kind it compiles to, and the mesh axes it runs over (the roofline
# times a term at its axes' bandwidth).
CAUSES = {
  "gradient_all_reduce": ("all-reduce", ("data", "fsdp", "pipe", "context")),
  "gradient_reduce_scatter": ("reduce-scatter", ("data",)),
  "parameter_all_gather": ("all-gather", ("data",)),
  "layer_weight_gather": ("all-gather", ("fsdp",)),
  "layer_grad_scatter": ("reduce-scatter", ("fsdp",)),
  "head_weight_gather": ("all-gather", ("fsdp",)),
  "head_grad_scatter": ("reduce-scatter", ("fsdp",)),
  "scalars": ("all-reduce", ("data", "fsdp", "pipe", "context", "tensor")),
  "tensor_layers": ("all-reduce", ("tensor",)),
  "tensor_embedding_head": ("all-reduce", ("tensor",)),
  "tensor_cross_entropy": ("all-reduce", ("tensor",)),
  "sequence_layer_gather": ("all-gather", ("tensor",)),
  "sequence_layer_scatter": ("reduce-scatter", ("tensor",)),
  "sequence_embedding_head_gather": ("all-gather", ("tensor",)),
  "sequence_embedding_head_scatter": ("reduce-scatter", ("tensor",)),
  "sequence_norm_grads": ("all-reduce", ("tensor",)),
  "sequence_positions_grad": ("all-gather", ("tensor",)),
  "pipeline_hops": ("collective-permute", ("pipe",)),
  "pipeline_entry": ("all-gather", ("pipe",)),
  "pipeline_exit": ("reduce-scatter", ("pipe",)),
  "context_kv_ring": ("collective-permute", ("context",)),
  "context_kv_grad_ring": ("collective-permute", ("context",)),
}
F32, PRED = 4, 1


def _devices(sizes, spec) -> int:
  return math.prod(sizes[a] for e in spec for a in spmd.axes_of(e))


def _share(n: int) -> float:
  return (n - 1) / n


def layers_run(m: ml_collections.ConfigDict, schedule) -> int:
  """Layers one device runs per micro-step: all L, or in a pipeline K = L/(S R) per iteration,
  bubbles included."""
  if schedule is None:
    return m.n_layers
  return m.n_layers // (schedule.stages * schedule.repeats) * schedule.layer_runs


def parameter_terms(
  layout: Layout,
  abstract_params,
  m: ml_collections.ConfigDict,
  schedule,
  grad_accum: int,
  remat: str,
  backend: str | None = None,
) -> dict[str, float]:
  """The parameter causes (module docstring), summed over the parameter tensors."""
  sizes = layout.axis_sizes
  lead = 3 if schedule else 1
  terms = dict.fromkeys(
    [
      "gradient_all_reduce",
      "gradient_reduce_scatter",
      "parameter_all_gather",
      "layer_weight_gather",
      "layer_grad_scatter",
      "head_weight_gather",
      "head_grad_scatter",
      "scalars",
    ],
    0.0,
  )
  logical = nnx.get_partition_spec(abstract_params)
  flat = jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0]
  for (path, names), leaf in zip(flat, jax.tree.leaves(abstract_params)):
    names = tuple(names)
    p, q = layout.spec(names), layout.spec(names, layout.state_rules)
    local = leaf.size / _devices(sizes, p)  # elements of this device's shard
    keys = [k for k in (getattr(k, "key", None) for k in path) if isinstance(k, str)]
    in_blocks = "blocks" in keys
    gathered = spmd.manual_part(P(*p[lead:]) if in_blocks else p)
    g = _devices(sizes, gathered)
    if g > 1:
      whole = local * g  # what one gather makes, per stored layer slice times the layers held
      wire = spmd.wire_dtype(model_lib.compute_dtype(keys, m.dtype), backend).itemsize
      if in_blocks and schedule is None:
        regather = keys[-1].endswith("_kernel") or (remat != "none" and keys[-1] != "proj_bias")
        gathers, scatters = grad_accum * m.n_layers * (1 + regather), grad_accum * m.n_layers
        per_layer = whole / m.n_layers
        terms["layer_weight_gather"] += gathers * per_layer * wire * _share(g)
        terms["layer_grad_scatter"] += scatters * per_layer * F32 * _share(g)
      else:  # the head's tensors, or a pipeline stage's layers: once per micro-step
        kind = "layer" if in_blocks else "head"
        terms[f"{kind}_weight_gather"] += grad_accum * whole * wire * _share(g)
        terms[f"{kind}_grad_scatter"] += grad_accum * whole * F32 * _share(g)
    mp, mq = spmd.manual_part(p), spmd.manual_part(q)
    scatter = math.prod(
      sizes[a] for e_p, e_q in zip(mp, mq) for a in spmd.axes_of(e_q) if a not in spmd.axes_of(e_p)
    )
    if scatter > 1:
      terms["gradient_reduce_scatter"] += local * F32 * _share(scatter)
      terms["parameter_all_gather"] += local * F32 * _share(scatter)
    held = {a for e in (*mp, *mq) for a in spmd.axes_of(e)}
    rest = math.prod(sizes[a] for a in spmd.MANUAL if a not in held)
    terms["gradient_all_reduce"] += 2 * local / scatter * F32 * _share(rest)
    split = _devices(sizes, q)  # where its update runs
    terms["scalars"] += (2 * 2 * F32 + 2 * PRED) * _share(split)
  terms["scalars"] += 2 * F32 * _share(spmd.shares(sizes))  # the loss
  return terms


def activation_terms(
  layout: Layout,
  m: ml_collections.ConfigDict,
  global_batch: int,
  seq_len: int,
  schedule,
  grad_accum: int,
  remat: str,
  backend: str | None = None,
) -> dict[str, float]:
  """The activation causes (module docstring). Per device the step's tokens are B T / X (whole
  sequences of its rows, X = data x fsdp), or 1/N of them under N-way context parallelism, each
  micro-step 1/k of them. Activations cross in the backend's wire dtype (spmd.wire_dtype), the
  loss's partials and the gradients in float32."""
  sizes = layout.axis_sizes
  x_ways, y_ways, stages = sizes["data"] * sizes["fsdp"], sizes["tensor"], sizes["pipe"]
  ring = sizes["context"]
  d, b = m.d_model, spmd.wire_dtype(m.dtype, backend).itemsize
  tokens = global_batch * seq_len / x_ways / ring
  terms = {}
  if y_ways > 1:
    layer_tokens = layers_run(m, schedule) * tokens / (schedule.microbatches if schedule else 1)
    # One [tokens, d] all-gather or reduce-scatter over tensor in every layer run.
    unit = layer_tokens * d * b * _share(y_ways)
    # Regions a layer's rerun leaves again in the backward: both, but the unit's last
    # (analysis.rerun_drops_last), averaged over the unit's layers.
    rerun_exits = 2 - analysis.rerun_drops_last(m, schedule) / analysis.remat_unit(m, schedule)
    embedding_head = 2 * 2 * tokens / stages * d * b * _share(y_ways)
    # Per layer the forward enters and leaves two tensor regions and the backward transposes both;
    # ZB-H1's W runs the backward's chain, and any remat rerun with it, a second time.
    chains = analysis.backward_chains(schedule)
    if layout.sequence_parallel:
      # Entries and exits are written in the model (layouts.tensor_region), so any remat policy
      # reruns them: "dots" keeps matmul outputs, not what a collective made of them.
      rerun = remat != "none"
      terms["sequence_layer_gather"] = unit * (2 + chains * (2 + 2 * rerun))
      terms["sequence_layer_scatter"] = unit * (2 + chains * (2 + rerun_exits * rerun))
      terms["sequence_embedding_head_gather"] = embedding_head / 2
      terms["sequence_embedding_head_scatter"] = embedding_head / 2
      vectors = 6 * d * m.n_layers + 2 * d
      # Reduced by the partitioner (tensor is its axis) inside every micro-step.
      terms["sequence_norm_grads"] = grad_accum * 2 * vectors * F32 * _share(y_ways)
      # The rows of the positions this device embeds: its part of the sequence.
      terms["sequence_positions_grad"] = seq_len / stages / ring * d * F32 * _share(y_ways)
    else:
      # The partitioner places tp's all-reduces after the matmuls: "dots" keeps the reduced
      # outputs, "full" reruns the matmuls and their all-reduces.
      terms["tensor_layers"] = 2 * unit * (2 + chains * (2 + rerun_exits * (remat == "full")))
      terms["tensor_embedding_head"] = embedding_head
    terms["tensor_cross_entropy"] = 3 * 2 * tokens / stages * F32 * _share(y_ways)
  if ring > 1:  # no pipeline: context.check refuses one
    hops = 2 * (ring - 1) * m.n_layers * tokens * d / y_ways * b  # K and V, N-1 hops, every layer
    terms["context_kv_ring"] = hops * (1 + (remat != "none"))
    terms["context_kv_grad_ring"] = hops
  if schedule is not None:
    terms["pipeline_hops"] = 2 * schedule.hops * tokens / schedule.microbatches * d * b
    if not schedule.hand_written:  # which spreads the embedding and head over the sequence
      terms["pipeline_entry"] = 2 * tokens * d * b * _share(stages)
      terms["pipeline_exit"] = 2 * tokens * d * b * _share(stages)
  return terms


def analytic_terms(s: "Setup", backend: str | None = None) -> dict[str, int]:
  """Bytes per step and device of every cause that moves any (CAUSES), rounded to whole bytes, for
  the run `s` describes (its layout, abstract parameters, model, batch, pipeline schedule and
  gradient accumulation), on `backend` (its wire dtype, spmd.wire_dtype; default this process's)."""
  layout, abstract_params, m, schedule = s.layout, s.abstract_params, s.cfg.model, s.schedule
  global_batch, seq_len = s.cfg.data.global_batch, s.cfg.data.seq_len
  grad_accum = s.cfg.train.grad_accum
  remat = "full" if layout.streams_weights else m.remat
  terms = {
    **parameter_terms(layout, abstract_params, m, schedule, grad_accum, remat, backend),
    **activation_terms(layout, m, global_batch, seq_len, schedule, grad_accum, remat, backend),
  }
  return {k: int(round(v)) for k, v in terms.items() if round(v)}


def by_kind(terms: dict[str, int]) -> dict[str, int]:
  """The terms summed by the collective kind each compiles to, as analysis.collective_bytes
  reports the compiled program."""
  kinds: dict[str, int] = {}
  for cause, value in terms.items():
    kind = CAUSES[cause][0]
    kinds[kind] = kinds.get(kind, 0) + value
  return dict(sorted(kinds.items()))
