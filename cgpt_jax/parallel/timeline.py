"""Pipeline schedules as data: which stage runs what, when, from S, M and R alone.

A schedule is each stage's program order of operations on (microbatch, chunk): F (forward), B
(backward; for the zero-bubble schedule only the input gradient) and W (the weight gradient, split
from B by Qi et al. 2023, "Zero Bubble Pipeline Parallelism"). `simulate` plays the orders against
their dependencies, each operation starting as soon as its stage is free and its input has arrived:

  F(s, j, c) after F(s-1, j, c); stage 0 of chunk c > 0 after F(S-1, j, c-1) (the ring's wrap)
  B(s, j, c) after F(s, j, c) and B(s+1, j, c); stage S-1 after B(0, j, c+1), or its own F on
             the last chunk (the loss)
  W(s, j, c) after B(s, j, c)

Unit durations: a chunk's F takes 1; a whole backward 2 (it computes two products per matmul);
split, B and W take 1 each. From the timeline come the bubble fraction (idle share of the span,
every stage together) beside each schedule's closed form, the peak number of microbatches whose
activations a stage holds (from the start of their F to the end of their last gradient), and a
picture.

- gpipe: every F, then every B (Huang et al. 2019). Bubble (S-1)/(M+S-1), M in flight.
- circular: gpipe over R chunks per stage, a microbatch looping the ring R times (this codebase's
  SPMD loop, pipeline.py). Bubble (S-1)/(M R + S-1).
- 1f1b: S-s-1 warm-up forwards, then one forward and one backward in turn, then the cool-down
  backwards (Narayanan et al. 2021, PipeDream-flush). Bubble (S-1)/(M+S-1) with at most S in flight.
- interleaved_1f1b: 1F1B over R chunks per stage in Megatron's order (groups of S microbatches per
  chunk; M a multiple of S). Bubble (S-1)/(M R + S-1).
- zb_h1: 1F1B's F and B, each W deferred into the stage's idle time, or run before a forward that
  would hold more than S microbatches, 1F1B's peak (ZB-H1). With F = B = W the bubble is
  (S-1)/(3M + S-1), a third of 1F1B's.

gpipe and circular run as one SPMD loop differentiated by autodiff (pipeline.py); 1f1b,
interleaved_1f1b and zb_h1 run these tables round by round with a hand-written backward
(pipeline_1f1b.py). plan.json puts every schedule's table beside the others at the same S, M and R.
"""

import dataclasses
import pathlib

NAMES = ("gpipe", "circular", "1f1b", "interleaved_1f1b", "zb_h1")


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str  # "F", "B" or "W"
  stage: int
  microbatch: int
  chunk: int
  start: int = 0
  duration: int = 1


def _order(name: str, S: int, M: int, R: int, s: int) -> list[tuple[str, int, int]]:
  """Stage s's program order: (kind, microbatch, chunk)."""
  if name in ("gpipe", "circular"):
    forward = [("F", j % M, j // M) for j in range(M * R)]
    return forward + [("B", j, c) for _, j, c in reversed(forward)]
  if name in ("1f1b", "zb_h1"):
    warm = min(S - s - 1, M)
    ops = [("F", j, 0) for j in range(warm)]
    for i in range(M - warm):
      ops += [("F", warm + i, 0), ("B", i, 0)]
    return ops + [("B", j, 0) for j in range(M - warm, M)]
  if name == "interleaved_1f1b":
    total = M * R

    def chunk_of(k, backward):  # groups of S microbatches visit the chunks in turn
      c = (k // S) % R
      return R - 1 - c if backward else c

    def microbatch_of(k):
      return (k // (S * R)) * S + k % S

    warm = min((S - s - 1) * 2 + (R - 1) * S, total)
    ops = [("F", microbatch_of(k), chunk_of(k, False)) for k in range(warm)]
    for i in range(total - warm):
      k = warm + i
      ops += [
        ("F", microbatch_of(k), chunk_of(k, False)),
        ("B", microbatch_of(i), chunk_of(i, True)),
      ]
    return ops + [("B", microbatch_of(k), chunk_of(k, True)) for k in range(total - warm, total)]
  raise ValueError(f"unknown schedule {name!r}")


def simulate(name: str, S: int, M: int, R: int = 1, rounds: bool = False) -> list[Op]:
  """Every operation of one step with its start time (module docstring), in no particular order.

  With `rounds` every operation takes one unit: the lockstep rounds the hand-written executor runs
  (pipeline_1f1b.py), each stage at most one operation per round, its message there by the next."""
  split = name == "zb_h1"
  release = "W" if split else "B"  # the operation after which a stage drops a microbatch
  orders = [_order(name, S, M, R, s) for s in range(S)]
  done: dict[tuple[str, int, int, int], int] = {}  # (kind, stage, microbatch, chunk) -> end time
  free, position = [0] * S, [0] * S
  held = [0] * S  # microbatches whose activations the stage holds: forward run, gradients not
  pending_w: list[list[tuple[int, int]]] = [[] for _ in range(S)]
  ops: list[Op] = []

  def ready(kind, s, j, c):
    """When the operation's inputs are there, or None while they are not yet computed."""
    if kind == "F":
      dep = [("F", s - 1, j, c)] if s > 0 else ([("F", S - 1, j, c - 1)] if c > 0 else [])
    elif kind == "B":
      nxt = [("B", s + 1, j, c)] if s < S - 1 else ([("B", 0, j, c + 1)] if c < R - 1 else [])
      dep = [("F", s, j, c)] + nxt
    else:
      dep = [("B", s, j, c)]
    times = [done.get(d) for d in dep]
    return None if None in times else max(times, default=0)

  def run(kind, s, j, c, at):
    duration = 1 if split or rounds or kind == "F" else 2
    ops.append(Op(kind, s, j, c, at, duration))
    done[(kind, s, j, c)] = at + duration
    free[s] = at + duration
    held[s] += (kind == "F") - (kind == release)

  remaining = sum(map(len, orders))
  while remaining:
    progressed = False
    for s in range(S):
      if position[s] == len(orders[s]):
        continue
      kind, j, c = orders[s][position[s]]
      at = ready(kind, s, j, c)
      if at is None:
        continue
      # ZB-H1: a deferred weight gradient fills the time this stage would wait, and runs before a
      # forward that would otherwise hold more than S microbatches, 1F1B's peak.
      while split and pending_w[s] and (free[s] + 1 <= at or (kind == "F" and held[s] >= S)):
        run("W", s, *pending_w[s].pop(0), free[s])
      run(kind, s, j, c, max(free[s], at))
      if split and kind == "B":
        pending_w[s].append((j, c))
      position[s] += 1
      remaining -= 1
      progressed = True
    if not progressed:
      raise RuntimeError(f"schedule {name} deadlocks at S={S}, M={M}, R={R}")
  for s in range(S):  # the cool-down: what is left of the weight gradients
    while pending_w[s]:
      run("W", s, *pending_w[s].pop(0), free[s])
  return ops


def span(ops: list[Op]) -> int:
  return max(o.start + o.duration for o in ops)


def bubble_fraction(ops: list[Op], S: int) -> float:
  """Idle share of S stages x the step's span."""
  return 1 - sum(o.duration for o in ops) / (S * span(ops))


def formula_bubble(name: str, S: int, M: int, R: int = 1) -> float:
  """The closed forms of the module docstring."""
  if name in ("gpipe", "1f1b"):
    return (S - 1) / (M + S - 1)
  if name in ("circular", "interleaved_1f1b"):
    return (S - 1) / (M * R + S - 1)
  if name == "zb_h1":
    return (S - 1) / (3 * M + S - 1)
  raise ValueError(f"unknown schedule {name!r}")


def peak_in_flight(ops: list[Op], S: int) -> list[int]:
  """Per stage, the most (microbatch, chunk) pairs whose activations it holds at once: from the
  start of their forward to the end of their last gradient (W where the backward is split)."""
  last = "W" if any(o.kind == "W" for o in ops) else "B"
  peaks = []
  for s in range(S):
    events = sorted(
      (o.start, 1) if o.kind == "F" else (o.start + o.duration, -1)
      for o in ops
      if o.stage == s and o.kind in ("F", last)
    )
    alive = peak = 0
    for _, delta in events:  # at equal times a backward's end (-1) frees before a forward holds
      alive += delta
      peak = max(peak, alive)
    peaks.append(peak)
  return peaks


def valid(name: str, S: int, M: int, R: int) -> bool:
  """Whether the schedule is defined at these sizes: chunks only for the circular ones, Megatron's
  interleaving in groups of S microbatches."""
  if name in ("circular", "interleaved_1f1b"):
    return R > 1 and (name == "circular" or M % S == 0)
  return R == 1


def compare(S: int, M: int, R: int) -> dict:
  """Every schedule defined at these sizes (and R = 1 for the unchunked ones)."""
  return {
    name: describe(name, S, M, r) for name in NAMES for r in sorted({1, R}) if valid(name, S, M, r)
  }


def describe(name: str, S: int, M: int, R: int = 1) -> dict:
  """The numbers plan.json and summary.json report for a schedule."""
  ops = simulate(name, S, M, R)
  return {
    "bubble_fraction_table": bubble_fraction(ops, S),
    "bubble_fraction_formula": formula_bubble(name, S, M, R),
    "peak_in_flight_per_stage": peak_in_flight(ops, S),
    "span_units": span(ops),
  }


def plot(ops: list[Op], S: int, title: str, path: pathlib.Path) -> None:
  """Stage x time, F blue, B green, W orange, each labelled with its microbatch (and chunk)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colours = {"F": "#4c72b0", "B": "#55a868", "W": "#dd8452"}
  chunked = any(o.chunk for o in ops)
  fig, ax = plt.subplots(figsize=(max(6, 0.22 * span(ops)), 0.45 * S + 1.2))
  for o in ops:
    ax.barh(o.stage, o.duration, left=o.start, color=colours[o.kind], edgecolor="white")
    label = f"{o.microbatch}" + (f".{o.chunk}" if chunked else "")
    ax.text(
      o.start + o.duration / 2, o.stage, label, ha="center", va="center", fontsize=6, color="white"
    )
  ax.set_yticks(range(S), [f"stage {s}" for s in range(S)])
  ax.invert_yaxis()
  ax.set_xlabel("time (a chunk's forward = 1)")
  ax.set_title(f"{title}: bubble {bubble_fraction(ops, S):.3f}", fontsize=9)
  kinds = [k for k in colours if any(o.kind == k for o in ops)]
  ax.legend(
    [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds],
    kinds,
    loc="lower right",
    fontsize=7,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
