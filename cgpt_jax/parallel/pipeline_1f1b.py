"""The 1F1B family over the `pipe` axis: 1F1B, interleaved 1F1B and ZB-H1, the backward written
by hand.

jax.grad of pipeline.py's loop runs every forward and then every backward (GPipe's order), so the
backward keeps M R + S - 1 stage inputs. Here the step's loss and gradients come out of the
schedule directly, and a stage holds only the microbatches its schedule has in flight.

The program. timeline.simulate plays the schedule in lockstep rounds (every operation one round);
`compile_program` turns that into static [round, stage] tables: which operation each stage runs
(F, B or, for ZB-H1, W), on which microbatch and chunk, and which buffer slots it reads and writes.
The step is one lax.scan over the rounds inside the step's shard_map. Each round every stage
- runs its operation, a lax.switch on its row of the table, so an idle stage computes nothing:
  - F: `jax.vjp` of its chunk of layers; the VJP's residuals, less the weights (which every round
    has anyway), go to a stash slot; under model.remat="full" the residuals are just the input.
    Stage 0 of chunk 0 embeds the microbatch first; the last stage of the last chunk runs the head,
    the loss and their gradient at once, and keeps the loss's gradient as its own cotangent.
  - B: the stored VJP applied to the cotangent that arrived from the next stage. Stage 0 of chunk 0
    then runs the embedding's backward. With ZB-H1, B keeps only the input gradient and W, later,
    the weight gradient: the same VJP twice (module docstring of timeline.py), each pruned by XLA
    to what its output needs.
- sends its output forward (s -> s+1, mod S: the ring's wrap feeds chunk c+1) and its input
  gradient backward (s -> s-1) by ppermute, and files what arrived into the slot the table names.

Slots. Each buffer (arrived activations, arrived cotangents, stashed residuals) has as many slots as
the most values a stage ever holds at once (interval colouring of write -> last read rounds), so
memory follows the schedule's in-flight count, not M.

Embedding and head run on the first and last stage for whole microbatches (Megatron's placement),
not spread over the stages along the sequence as pipeline.py does: the loss of microbatch j must
exist before its backward can start, in the middle of the step.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgpt_jax import model as model_lib
from cgpt_jax.parallel import spmd, timeline

AXIS = "pipe"
SCHEDULES = ("1f1b", "interleaved_1f1b", "zb_h1")
# The branches of a round's lax.switch, in table order.
BRANCHES = (
  "idle",
  "forward",
  "forward_embed",
  "forward_head",
  "backward",
  "backward_embed",
  "weights",
)
IDLE, FORWARD, FORWARD_EMBED, FORWARD_HEAD, BACKWARD, BACKWARD_EMBED, WEIGHTS = range(len(BRANCHES))
# A table row: the branch, its microbatch and chunk, the slots it reads (arrived activation,
# cotangent)
# and writes or reads (stash), and the slots this stage files the round's arrivals in (-1: none).
FIELDS = (
  "branch",
  "microbatch",
  "chunk",
  "act_slot",
  "cot_slot",
  "stash_slot",
  "file_act",
  "file_cot",
)
BRANCH, MICROBATCH, CHUNK, ACT_SLOT, COT_SLOT, STASH_SLOT, FILE_ACT, FILE_COT = range(len(FIELDS))


@dataclasses.dataclass(frozen=True)
class Program:
  """A schedule as lockstep rounds: table[round, stage, FIELDS] and each buffer's slot count."""

  name: str
  stages: int
  microbatches: int
  repeats: int
  table: np.ndarray  # int32 [rounds, S, len(FIELDS)]; slots -1 where unused
  act_slots: int
  cot_slots: int
  stash_slots: int

  @property
  def rounds(self) -> int:
    return self.table.shape[0]

  def branch_runs(self) -> list[float]:
    """Rounds each branch runs, averaged over the stages: per device, as analysis counts FLOPs."""
    branch = self.table[:, :, BRANCH]
    return [float((branch == b).sum()) / self.stages for b in range(len(BRANCHES))]

  def branch_shares(self) -> list[float]:
    """The share of the rounds each branch of the round's switch runs: what the compiled
    program's conditional does, for analysis to count its FLOPs and bytes."""
    return [runs / self.rounds for runs in self.branch_runs()]

  def messages(self) -> dict[str, int]:
    """Activations and cotangents that cross to another stage in the step (all stages)."""
    return {
      "forward": int((self.table[:, :, FILE_ACT] >= 0).sum()),
      "backward": int((self.table[:, :, FILE_COT] >= 0).sum()),
    }


def _colour(intervals: list[tuple[int, int, Any]]) -> tuple[dict, int]:
  """Slots for values alive from the end of round `written` to round `read` (inclusive): a slot is
  free again for a value written in the round of its last read, since writes follow reads."""
  ends: list[int] = []
  slot_of = {}
  for written, read, key in sorted(intervals, key=lambda i: i[:2]):
    slot = next((i for i, end in enumerate(ends) if end <= written), len(ends))
    ends[slot : slot + 1] = [read]
    slot_of[key] = slot
  return slot_of, len(ends)


def compile_program(name: str, S: int, M: int, R: int) -> Program:
  """The schedule's lockstep rounds (timeline.simulate with unit operations) as tables."""
  ops = timeline.simulate(name, S, M, R, rounds=True)
  at = {(o.kind, o.stage, o.microbatch, o.chunk): o.start for o in ops}
  split = name == "zb_h1"
  last = "W" if split else "B"  # the operation after which a microbatch's stash and cotangent go
  table = np.full((max(o.start for o in ops) + 1, S, len(FIELDS)), -1, np.int32)
  table[:, :, BRANCH] = IDLE

  def feeding_forward(s, c):  # the stage and chunk whose output (s, c) takes, None: the embedding
    return (s - 1, c) if s > 0 else (S - 1, c - 1) if c > 0 else None

  def feeding_backward(s, c):  # the stage and chunk whose input gradient (s, c) takes, None: loss
    return (s + 1, c) if s < S - 1 else (0, c + 1) if c < R - 1 else None

  # Per stage and buffer, each value's (round written, last round read, key (stage, mb, chunk)).
  acts, cots, stash = ([[] for _ in range(S)] for _ in range(3))
  for o in (o for o in ops if o.kind == "F"):
    s, j, c = o.stage, o.microbatch, o.chunk
    done = at[last, s, j, c]
    if src := feeding_forward(s, c):
      acts[s].append((at["F", src[0], j, src[1]], o.start, (s, j, c)))
    src = feeding_backward(s, c)
    cots[s].append((at["B", src[0], j, src[1]] if src else o.start, done, (s, j, c)))
    stash[s].append((o.start, done, (s, j, c)))
  slot, counts = [], []
  for per_stage in (acts, cots, stash):
    coloured = [_colour(values) for values in per_stage]
    slot.append({key: i for found, _ in coloured for key, i in found.items()})
    counts.append(max(1, *(n for _, n in coloured)))
  act_slot, cot_slot, stash_slot = slot

  for o in ops:
    s, j, c, t = o.stage, o.microbatch, o.chunk, o.start
    row = table[t, s]
    first, final = feeding_forward(s, c) is None, feeding_backward(s, c) is None
    row[MICROBATCH], row[CHUNK], row[STASH_SLOT] = j, c, stash_slot[s, j, c]
    if o.kind == "F":
      row[BRANCH] = FORWARD_EMBED if first else FORWARD_HEAD if final else FORWARD
      if not first:
        row[ACT_SLOT] = act_slot[s, j, c]
      if final:  # the loss's gradient becomes this microbatch's cotangent here
        row[COT_SLOT] = cot_slot[s, j, c]
      else:  # the output goes on to the next stage, or round the ring to the next chunk
        to, chunk = (s + 1) % S, c + (s == S - 1)
        table[t, to, FILE_ACT] = act_slot[to, j, chunk]
    else:
      row[BRANCH] = {"B": BACKWARD_EMBED if first else BACKWARD, "W": WEIGHTS}[o.kind]
      row[COT_SLOT] = cot_slot[s, j, c]
      if o.kind == "B" and not first:  # the input gradient goes back, or round to chunk c - 1
        to, chunk = (s - 1) % S, c - (s == 0)
        table[t, to, FILE_COT] = cot_slot[to, j, chunk]
  return Program(name, S, M, R, table, *counts)


# ----------------------------------------------------------------------------------------------
# The executor
# ----------------------------------------------------------------------------------------------
class Carry(NamedTuple):
  acts: jax.Array  # [act_slots, mb, T, d] activations that arrived, waiting for their forward
  cots: jax.Array  # [cot_slots, mb, T, d] cotangents that arrived (or the loss's own)
  stash: Any  # residual leaves, each [stash_slots, ...]
  block_grads: Any  # [R, K, ...] float32
  other_grads: Any  # embedding, positions, final norm: float32
  loss: jax.Array
  to_next: jax.Array  # this round's output, for s + 1
  to_prev: jax.Array  # this round's input gradient, for s - 1


def make_value_and_grad(cfg, program: Program, graphdef, bubble_fill: float = 0.0):
  """(loss, gradients)(loaded, rows, loss_scale) for one device inside the step's shard_map.

  `loaded` is the parameters as the forward uses them (stage blocks [R, 1, K, ...] of this stage,
  gathered and cast), rows [b, T+1] this device's token rows. The loss is loss_scale times the sum
  over microbatches of each microbatch's mean token loss, on the last stage (0 elsewhere); the
  gradients are the loss's, with respect to `loaded`, in float32. `bubble_fill` is what every
  buffer holds before a real value is filed in it (tests set NaN to prove none is ever read).
  """

  def value_and_grad(loaded, rows, loss_scale):
    device = _StageDevice(cfg, program, graphdef, loaded, rows, loss_scale)
    carry, _ = jax.lax.scan(
      device.round, device.initial_carry(bubble_fill), jnp.asarray(program.table)
    )
    return device.loss_and_grads(carry, loaded)

  return value_and_grad


class _StageDevice:
  """One device's stage of the hand-written schedule: the program's rounds run as one scan, each
  round one branch of a switch (idle, forward, backward or weights) picked by the program's table
  row for this device, then the two ring hops. Shapes: micro [M, mb, T+1] token rows; every
  message, activation and cotangent slot [mb, T, d]."""

  def __init__(self, cfg, program: Program, graphdef, loaded, rows, loss_scale):
    self.cfg, self.program, self.graphdef, self.loss_scale = cfg, program, graphdef, loss_scale
    state = nnx.State(dict(loaded))
    self.stacked = state["blocks"]
    self.blocks = jax.tree.map(lambda a: a[:, 0], state["blocks"])  # this stage's [R, K, ...]
    self.others = nnx.State({k: v for k, v in state.items() if k != "blocks"})
    self.block_def = nnx.split(nnx.merge(graphdef, state).blocks)[0]
    b, t1 = rows.shape
    self.mb, self.T = b // program.microbatches, t1 - 1
    # Microbatch j: rows j, j + M, ...
    self.micro = rows.reshape(self.mb, program.microbatches, t1).swapaxes(0, 1)
    self.compute = jax.tree.leaves(self.blocks)[0].dtype
    self.wire = spmd.wire_dtype(self.compute)
    self.stage = model_lib.rematerialise(self._stage, cfg.remat)
    # The VJP's structure, traced once ahead: its treedef holds the backward's jaxpr, the same
    # program whichever trace made it, and the weights' places among its leaves.
    self.structure: dict = {}
    x_shape = jax.ShapeDtypeStruct((self.mb, self.T, cfg.d_model), self.compute)
    self.stash_shapes = jax.eval_shape(self._residual_shapes, self.chunk(0), x_shape)
    split = program.name == "zb_h1"
    backward_part = "input" if split else "both"
    self.branches = [
      self.idle,
      self.forward,
      lambda carry, row: self.forward(carry, row, embed_first=True),
      lambda carry, row: self.forward(carry, row, head_after=True),
      lambda carry, row: self.backward(carry, row, part=backward_part),
      lambda carry, row: self.backward(carry, row, embed_after=True, part=backward_part),
      # Only ZB-H1 splits the weights' gradient off (W); elsewhere this branch is never taken.
      (lambda carry, row: self.backward(carry, row, part="weights")) if split else self.idle,
    ]

  # -- the model's pieces -------------------------------------------------------------------------
  def whole(self, o):
    """The model, for its embedding and head (o: the parameters outside the blocks)."""
    return nnx.merge(self.graphdef, nnx.State({**o, "blocks": self.stacked}))

  def embed(self, o, tokens):
    return self.whole(o).embed(tokens).astype(self.compute)

  def head_loss(self, o, y, targets):
    return jnp.mean(self.whole(o).head_nll(y, targets)) * self.loss_scale

  def _stage(self, w, x):
    return model_lib.scan_blocks(self.cfg, self.block_def, w, x, remat="none")

  def chunk(self, c):
    """Chunk c's K blocks of this stage."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, c, keepdims=False), self.blocks)

  # -- the stage's VJP, its residuals stashed without the weights ----------------------------------
  def split_vjp(self, w, x):
    """The stage's output and VJP; of the VJP's leaves (its residuals), which are the weights
    themselves (not stashed: every round has them), and the rest."""
    y, vjp = jax.vjp(self.stage, w, x)
    leaves, treedef = jax.tree.flatten(vjp)
    weights = jax.tree.leaves(w)
    where = [next((i for i, q in enumerate(weights) if q is leaf), None) for leaf in leaves]
    return y, treedef, where, [leaf for leaf, i in zip(leaves, where) if i is None]

  def _residual_shapes(self, w, x):
    _, self.structure["treedef"], self.structure["where"], rest = self.split_vjp(w, x)
    return rest

  def rebuilt_vjp(self, w, stashed):
    weights, stashed = jax.tree.leaves(w), iter(stashed)
    leaves = [next(stashed) if i is None else weights[i] for i in self.structure["where"]]
    return jax.tree.unflatten(self.structure["treedef"], leaves)

  # -- the branches: (carry, row) -> carry -----------------------------------------------------
  def idle(self, carry, row):
    return carry

  def forward(self, carry, row, embed_first=False, head_after=False):
    tokens = _get(self.micro, row[MICROBATCH])
    if embed_first:
      x = self.embed(self.others, tokens[:, :-1])
    else:
      x = _get(carry.acts, row[ACT_SLOT]).astype(self.compute)
    y, _, where, residuals = self.split_vjp(self.chunk(row[CHUNK]), x)
    assert where == self.structure["where"], "the stage's VJP holds its weights elsewhere"
    stash = [_put(buf, row[STASH_SLOT], r) for buf, r in zip(carry.stash, residuals)]
    carry = carry._replace(stash=stash)
    if not head_after:
      return carry._replace(to_next=y.astype(self.wire))
    # The last layer's output: the loss now, and its gradient as this microbatch's cotangent.
    loss, (d_others, dy) = jax.value_and_grad(self.head_loss, argnums=(0, 1))(
      self.others, y, tokens[:, 1:]
    )
    return carry._replace(
      loss=carry.loss + loss,
      other_grads=_add(carry.other_grads, d_others),
      cots=_put(carry.cots, row[COT_SLOT], dy.astype(self.wire)),
    )

  def backward(self, carry, row, embed_after=False, part="both"):
    c = row[CHUNK]
    dy = _get(carry.cots, row[COT_SLOT]).astype(self.compute)
    stashed = [_get(buf, row[STASH_SLOT]) for buf in carry.stash]
    dw, dx = self.rebuilt_vjp(self.chunk(c), stashed)(dy)
    if part in ("both", "weights"):
      carry = carry._replace(block_grads=_add_chunk(carry.block_grads, c, dw))
    if part == "weights":
      return carry
    if not embed_after:
      return carry._replace(to_prev=dx.astype(self.wire))
    tokens = _get(self.micro, row[MICROBATCH])[:, :-1]
    _, embed_vjp = jax.vjp(lambda o: self.embed(o, tokens), self.others)
    (d_others,) = embed_vjp(dx)
    return carry._replace(other_grads=_add(carry.other_grads, d_others))

  # -- the rounds ------------------------------------------------------------------------------
  def round(self, carry, rows_of_round):
    """This device's branch of the round, then both ring hops (every device, every round)."""
    S = self.program.stages
    row = rows_of_round[jax.lax.axis_index(AXIS)]
    carry = jax.lax.switch(row[BRANCH], self.branches, carry, row)
    arrived_act = jax.lax.ppermute(carry.to_next, AXIS, [(k, (k + 1) % S) for k in range(S)])
    arrived_cot = jax.lax.ppermute(carry.to_prev, AXIS, [(k, (k - 1) % S) for k in range(S)])
    return carry._replace(
      acts=_file(carry.acts, row[FILE_ACT], arrived_act),
      cots=_file(carry.cots, row[FILE_COT], arrived_cot),
    ), None

  def initial_carry(self, bubble_fill: float) -> "Carry":
    """Every buffer holding `bubble_fill` until a real value is filed in it."""

    def fill(shape, dtype):
      return jnp.full(shape, bubble_fill if jnp.issubdtype(dtype, jnp.floating) else 0, dtype)

    p, message = self.program, (self.mb, self.T, self.cfg.d_model)
    return Carry(
      acts=fill((p.act_slots, *message), self.wire),
      cots=fill((p.cot_slots, *message), self.wire),
      stash=[fill((p.stash_slots, *r.shape), r.dtype) for r in self.stash_shapes],
      block_grads=jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), self.blocks),
      other_grads=jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), self.others),
      loss=jnp.zeros((), jnp.float32),
      to_next=fill(message, self.wire),
      to_prev=fill(message, self.wire),
    )

  def loss_and_grads(self, carry, loaded):
    """The loss, and the gradients in `loaded`'s structure and dtypes (for its load's VJP, which
    casts back to float32)."""
    grads = nnx.State(
      {**carry.other_grads, "blocks": jax.tree.map(lambda g: g[:, None], carry.block_grads)}
    )
    grads = jax.tree.unflatten(jax.tree.structure(loaded), jax.tree.leaves(grads))
    return carry.loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, loaded)


def _add(acc, g):
  return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)


def _add_chunk(acc, c, dw):
  return jax.tree.map(lambda a, g: _put(a, c, _get(a, c) + g.astype(jnp.float32)), acc, dw)


def _get(a, i):
  return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _put(a, i, value):
  return jax.lax.dynamic_update_index_in_dim(a, value.astype(a.dtype), i, 0)


def _file(buffer, slot, value):
  """buffer with value in `slot`, or unchanged where slot is -1 (nothing real arrived)."""
  i = jnp.maximum(slot, 0)
  return _put(buffer, i, jnp.where(slot >= 0, value, _get(buffer, i)))
