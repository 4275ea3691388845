"""Pipeline parallelism over the `pipe` mesh axis: GPipe and circular schedules in the step's
shard_map.

Stages. The L stacked layers are stored as [R, S, K, ...] (repeats x stages x layers per stage): a
free reshape of [L, ...] that keeps layer order, layer (r S + s) K + k at [r, s, k]. The `stage`
dimension is split over `pipe`, so device s holds layers sK .. sK+K-1 of every repeat: GPipe when
R = 1, the circular (interleaved) schedule when R > 1. The schedule runs inside the step's shard_map
(spmd.py), where `pipe`, `data` and `fsdp` are manual; tensor stays with the partitioner.

Schedule (SPMD: every stage runs every iteration). M microbatches, M R + S - 1 iterations. At
iteration t stage s works on j = t - s (microbatch j mod M, repeat j div M) when 0 <= j < M R and
is in the bubble otherwise. Activations move one stage per iteration on a ring ppermute
(s -> s+1 mod S). Stage 0 takes fresh microbatches for repeat 0 and the ring's wrap-around for later
repeats, held in a buffer until their turn: microbatch j leaves stage S-1 at iteration j + S - 1 and
re-enters stage 0 at j + M, hence M >= S.

Bubbles. A bubble iteration's input is replaced by zeros with a select before the stage runs, so
whatever the carries hold there (the tests fill them with NaN) never reaches the loss or the
gradients. The bubble's FLOPs are still spent: the layers' compiled FLOPs are (M R + S - 1) / (M R)
times the useful ones, idle fraction (S - 1) / (M R + S - 1).

Embedding and head stay outside the schedule, replicated over `pipe`, each device taking 1/S of the
sequence (train.make_local_loss). Their work is per token, so the S stages share it evenly, instead
of the first and last stage doing all of it (for small models the head over 50k words is the
biggest matmul and would be a bubble of its own). The price shows in the collective bytes: stage
inputs all-gathered over `pipe` on entry, outputs reduce-scattered on exit (transposed in the
backward); the replicated embedding, positions and final norm are reduced once over data x pipe.

Memory. model.remat applies to each iteration: with "full" the backward keeps one stage input
[mb, T, D] per iteration. jax.grad of this loop runs all forwards, then all backwards, GPipe's
order, so activations grow with M; the 1F1B family (at most S microbatches alive per stage) runs
its backward by hand (pipeline_1f1b.py). Every schedule's evaluation runs this forward loop.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax import model as model_lib
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import pipeline_1f1b, spmd, timeline
from cgpt_jax.parallel.layouts import Layout

# gpipe and circular run as the loop below, differentiated by autodiff; the 1F1B family runs its
# own backward (pipeline_1f1b.py).
SCHEDULES = ("gpipe", "circular", *pipeline_1f1b.SCHEDULES)
CHUNKED = ("circular", "interleaved_1f1b")  # the schedules with R > 1 chunks per stage
AXIS = "pipe"


@dataclasses.dataclass(frozen=True)
class Schedule:
  name: str
  stages: int  # S, the pipe axis
  repeats: int  # R, passes of each microbatch around the ring (1 = GPipe)
  microbatches: int  # M

  @property
  def hand_written(self) -> bool:
    """Whether the step's backward is written by hand (the 1F1B family) rather than autodiff's."""
    return self.name in pipeline_1f1b.SCHEDULES

  @functools.cached_property
  def program(self) -> pipeline_1f1b.Program:
    """The hand-written schedule's lockstep rounds (pipeline_1f1b.compile_program)."""
    return pipeline_1f1b.compile_program(self.name, self.stages, self.microbatches, self.repeats)

  @property
  def iterations(self) -> int:
    """Iterations of the forward loop below, M R + S - 1: the step's under gpipe and circular,
    and every schedule's evaluation (a forward alone runs in any order)."""
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def hops(self) -> int:
    """Rounds of the step in which every stage sends one activation on and one gradient back:
    each loop iteration and its transpose, or each round of a hand-written schedule."""
    return self.program.rounds if self.hand_written else self.iterations

  @property
  def bubble_fraction(self) -> float:
    """Idle share of each stage's time by the schedule's closed form (timeline.formula_bubble)."""
    return timeline.formula_bubble(self.name, self.stages, self.microbatches, self.repeats)

  @property
  def layer_runs(self) -> int:
    """Chunk forwards each stage computes per micro-step: every loop iteration, bubbles included,
    M R + S - 1; a hand-written schedule's idle rounds compute nothing, so M R."""
    return self.microbatches * self.repeats if self.hand_written else self.iterations

  @property
  def backward_chains(self) -> int:
    """Times a microbatch's backward runs its chain of input gradients through a stage: once, or
    twice under ZB-H1, whose W applies the stage's VJP again to reach the weights (B kept only the
    input gradient; pipeline_1f1b.py)."""
    return 2 if self.name == "zb_h1" else 1

  @property
  def layer_flops_ratio(self) -> float:
    """Compiled over useful layer FLOPs: (M R + S - 1) / (M R) in the SPMD loop, 1 hand-written."""
    return self.layer_runs / (self.microbatches * self.repeats)

  def describe(self) -> dict:
    """The schedule, its formulas, and its table (timeline.py) beside those of the other schedules
    at the same sizes."""
    S, M, R = self.stages, self.microbatches, self.repeats
    others = timeline.compare(S, M, R)  # this schedule's table among them
    table = others.pop(self.name)
    described = {
      "schedule": self.name,
      "stages": S,
      "repeats": R,
      "microbatches": M,
      "iterations": self.iterations,
      "bubble_fraction_theory": self.bubble_fraction,
      "bubble_fraction_table": table["bubble_fraction_table"],
      "peak_in_flight_per_stage": table["peak_in_flight_per_stage"],
      "layer_flops_ratio_theory": self.layer_flops_ratio,
      "other_schedules": others,
    }
    if self.hand_written:
      p = self.program
      described["executed"] = {
        "rounds": p.rounds,
        "bubble_fraction_rounds": p.branch_runs()[pipeline_1f1b.IDLE] / p.rounds,
        "slots": {"activations": p.act_slots, "cotangents": p.cot_slots, "stash": p.stash_slots},
        "messages": p.messages(),
        "messages_sent": 2 * S * p.rounds,
      }
    return described

  def plot(self, path) -> None:
    """The schedule's timeline, stage x time, as a PNG."""
    ops = timeline.simulate(self.name, self.stages, self.microbatches, self.repeats)
    timeline.plot(
      ops, self.stages, f"{self.name} S={self.stages} M={self.microbatches} R={self.repeats}", path
    )


def make_schedule(cfg: ml_collections.ConfigDict, layout: Layout) -> Schedule | None:
  """The schedule for this config and layout (None when the pipe axis is 1), validated."""
  stages = layout.mesh.shape[AXIS]
  if stages == 1:
    return None
  p, m, d = cfg.pipeline, cfg.model, cfg.data
  if p.schedule not in SCHEDULES:
    raise InputError(
      f"config pipeline.schedule={p.schedule!r}: unknown schedule. "
      f"Choose one of: {', '.join(SCHEDULES)}."
    )
  if p.schedule not in CHUNKED and p.repeats != 1:
    raise InputError(
      f"config pipeline.repeats={p.repeats}: repeats apply to the circular and "
      f"interleaved_1f1b schedules only, not {p.schedule}. Set "
      "--config.pipeline.schedule=circular (or interleaved_1f1b), or "
      "--config.pipeline.repeats=1."
    )
  if p.schedule == "interleaved_1f1b" and (p.repeats < 2 or p.microbatches % stages):
    raise InputError(
      f"config pipeline.repeats={p.repeats}, pipeline.microbatches={p.microbatches}: "
      f"interleaved_1f1b runs R >= 2 chunks per stage over groups of {stages} microbatches "
      f"(Megatron's interleaving). Set --config.pipeline.repeats=2 or more and microbatches to a "
      f"multiple of {stages}."
    )
  if p.repeats < 1 or p.microbatches < 1:
    raise InputError(
      f"config pipeline: repeats={p.repeats} and microbatches={p.microbatches} must be "
      "positive integers."
    )
  if m.n_layers % (stages * p.repeats):
    raise InputError(
      f"config model.n_layers={m.n_layers}: not divisible by pipe stages x repeats = {stages} x "
      f"{p.repeats} = {stages * p.repeats}, so the stages would hold different numbers of layers. "
      f"Use a layer count that is a multiple of {stages * p.repeats}, or change mesh.pipe or "
      "pipeline.repeats."
    )
  if p.microbatches < stages:
    raise InputError(
      f"config pipeline.microbatches={p.microbatches}: fewer microbatches than the {stages} pipe "
      f"stages; stages would idle most of the step (and the circular schedule needs M >= S to loop "
      f"back). Use --config.pipeline.microbatches={stages} or more."
    )
  ways = p.microbatches * layout.batch_size_divisor
  k = cfg.train.grad_accum  # the pipeline runs once per micro-step, on 1/k of the batch
  for key, batch in (("global_batch", d.global_batch // k), ("eval_batch", d.eval_batch)):
    if batch % ways:
      per_step = f" / train.grad_accum {k} = {batch}" if key == "global_batch" and k > 1 else ""
      raise InputError(
        f"config data.{key}={d[key]}{per_step}: not divisible by microbatches x batch devices = "
        f"{p.microbatches} x {layout.batch_size_divisor} = {ways}. Use a multiple of {ways}, or "
        "change pipeline.microbatches."
      )
  if d.seq_len % stages:
    raise InputError(
      f"config data.seq_len={d.seq_len}: not divisible by the {stages} pipe stages, which share "
      f"the embedding and head along the sequence. Use a multiple of {stages}."
    )
  return Schedule(p.schedule, stages, p.repeats, p.microbatches)


# ----------------------------------------------------------------------------------------------
# Parameters: [L, ...] (layer order, every other layout) <-> [R, S, K, ...] (pipeline layouts)
# ----------------------------------------------------------------------------------------------
def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def stage_shape(layer_shape: tuple[int, ...], schedule: Schedule) -> tuple[int, ...]:
  """[L, ...] -> [R, S, K, ...]: layer l = (r S + s) K + k, so a reshape, no data moved."""
  r, s = schedule.repeats, schedule.stages
  return (r, s, layer_shape[0] // (r * s), *layer_shape[1:])


def layer_shape(staged_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Inverse of stage_shape."""
  return (staged_shape[0] * staged_shape[1] * staged_shape[2], *staged_shape[3:])


def is_staged(path, leaf, schedule: Schedule) -> bool:
  """A stacked-layer array of a state in stage order: a parameter under `blocks`, or an optimizer
  moment shaped like one (Adafactor's (1,) placeholders and the counters are not)."""
  in_blocks = any(getattr(k, "key", None) == "blocks" for k in path)
  return (
    in_blocks and leaf.ndim >= 3 and tuple(leaf.shape[:2]) == (schedule.repeats, schedule.stages)
  )


def to_stages(params: nnx.State, schedule: Schedule) -> nnx.State:
  """Reshapes every stacked layer parameter [L, ...] to [R, S, K, ...], logical names following."""

  def split(v: nnx.Variable) -> nnx.Variable:
    names = tuple(v.get_metadata()["out_sharding"])
    shape = stage_shape(v.shape, schedule)
    value = v.get_value()
    value = (
      jax.ShapeDtypeStruct(shape, v.dtype)
      if isinstance(value, jax.ShapeDtypeStruct)
      else value.reshape(shape)
    )
    return v.replace(value=value, out_sharding=("repeats", "stage", *names))

  return _map_blocks(split, params)


def from_stages(params: nnx.State, schedule: Schedule | None) -> nnx.State:
  """Inverse of to_stages: [R, S, K, ...] back to [L, ...] in layer order (as they are without a
  pipeline schedule)."""
  if schedule is None:
    return params

  def merge(v: nnx.Variable) -> nnx.Variable:
    names = tuple(v.get_metadata()["out_sharding"])[2:]
    return v.replace(value=v.get_value().reshape(layer_shape(v.shape)), out_sharding=names)

  return _map_blocks(merge, params)


def _map_blocks(f, params: nnx.State) -> nnx.State:
  params = nnx.State(dict(params))
  params["blocks"] = jax.tree.map(f, params["blocks"], is_leaf=_is_var)
  return params


# ----------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------
def make_run_blocks(
  cfg: ml_collections.ConfigDict, schedule: Schedule, load, bubble_fill: float = 0.0
):
  """A `run_blocks(graphdef, stacked, x)` for model.GPT that runs the stacked layers as `schedule`
  over the pipe axis. It runs inside the step's shard_map (spmd.py), where `pipe` and the batch axes
  are manual: `stacked` is this stage's [R, 1, K, ...] and x this device's rows of its 1/S of the
  sequence, [b, T/S, d]. `load(blocks, stacked_dims)` gives the weights as the forward uses them
  (cast, and gathered where fsdp splits them). `bubble_fill` is what the carries hold before real
  activations arrive (tests set NaN to prove it never leaks)."""
  S, R, M = schedule.stages, schedule.repeats, schedule.microbatches
  ring = [(k, (k + 1) % S) for k in range(S)]

  def run_blocks(graphdef, stacked, x):
    # A stage runs the same layers at every iteration, so under fsdp its weights are gathered once
    # per micro-step here, and their gradient reduce-scattered once (the gather's transpose), rather
    # than once per layer and iteration, M R + S - 1 times, as a per-layer gather in the loop would:
    # torchtitan's default with a pipeline too (FSDP2 reshard_after_forward off). The price is the
    # stage's whole weights and gradient held through the step (13B, pipe 4 x fsdp 4 x tensor 4,
    # M 8: fsdp's bytes 106 -> 7 GB per step and device, memory 25.0 -> 32.0 GiB).
    stacked = load(stacked, 3)

    def stage(stacked, repeat, inp):
      weights = jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, repeat, keepdims=False), stacked
      )
      return model_lib.scan_blocks(cfg, graphdef, weights, inp, remat="none")

    # Per iteration: "full" keeps only each iteration's stage input for the backward.
    stage = model_lib.rematerialise(stage, cfg.remat)
    compute = x.dtype
    wire = spmd.wire_dtype(compute)  # float32 on CPU, whose compiler aborts on a bf16 ppermute
    # Every stage sees whole sequences: an all-gather over pipe on entry (its transpose, a
    # reduce-scatter of the input gradient, in the backward).
    x = jax.lax.all_gather(x.astype(wire), AXIS, axis=1, tiled=True)
    b, t, d = x.shape
    # Microbatch i is rows i, i+M, i+2M, ... of this device's rows.
    xs = x.reshape(b // M, M, t, d).swapaxes(0, 1)
    stacked = jax.tree.map(lambda a: a[:, 0], stacked)  # this stage's [R, K, ...]
    s = jax.lax.axis_index(AXIS)
    fill = jnp.full(xs.shape[1:], bubble_fill, wire)

    def iteration(carry, it):
      state, inbox, outbox = carry  # state: what the previous stage sent last iteration
      # Stage 0 keeps the wrap-around from stage S-1 (microbatch it - S) until its next repeat.
      back = it - S
      keep = (s == 0) & (back >= 0) & (back < M * (R - 1))
      inbox = _put(inbox, back % M, jnp.where(keep, state, _get(inbox, back % M)))
      j = it - s
      valid = (j >= 0) & (j < M * R)
      inp = jnp.where(s == 0, _get(inbox, it % M), state)
      out = stage(stacked, jnp.clip(j // M, 0, R - 1), jnp.where(valid, inp, 0).astype(compute))
      out = out.astype(wire)
      done = valid & (s == S - 1) & (j >= M * (R - 1))
      outbox = _put(outbox, j % M, jnp.where(done, out, _get(outbox, j % M)))
      return (jax.lax.ppermute(out, AXIS, ring), inbox, outbox), None

    carry = (fill, xs, jnp.broadcast_to(fill, xs.shape))
    (_, _, outbox), _ = jax.lax.scan(iteration, carry, jnp.arange(schedule.iterations))
    ys = jnp.where(s == S - 1, outbox, 0).swapaxes(0, 1).reshape(b, t, d)  # the last stage's
    # Back to each device's part of the sequence: a reduce-scatter over pipe of the last stage's
    # result (the others add zeros), an all-gather of its gradient in the backward.
    return jax.lax.psum_scatter(ys, AXIS, scatter_dimension=1, tiled=True).astype(compute)

  return run_blocks


def _get(a, i):
  return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _put(a, i, value):
  return jax.lax.dynamic_update_index_in_dim(a, value, i, 0)
