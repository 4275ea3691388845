"""Pipeline schedules as tables (cgpt_jax/parallel/timeline.py): legal, the papers' bubbles and
memory."""

import json

import pytest
from helpers import tiny_config

from cgpt_jax.parallel import timeline
from cgpt_jax.train import aot_plan

SIZES = [(2, 4, 1), (4, 4, 1), (4, 8, 1), (4, 16, 1), (8, 16, 1), (2, 4, 2), (4, 8, 2), (4, 16, 3)]
CASES = [
  (name, S, M, R) for name in timeline.NAMES for S, M, R in SIZES if timeline.valid(name, S, M, R)
]


def closed_form(name, S, M, R):
  """The papers' bubbles with a chunk's F = 1 (B = 2, or B = W = 1 split): GPipe and 1F1B
  (S-1)/(M+S-1); over R chunks (S-1)/(MR+S-1); ZB-H1 (S-1)(F+B-W) idle against M(F+B+W) work."""
  if name in ("gpipe", "1f1b"):
    return (S - 1) / (M + S - 1)
  if name in ("circular", "interleaved_1f1b"):
    return (S - 1) / (M * R + S - 1)
  return (S - 1) * (1 + 1 - 1) / (M * 3 + (S - 1) * (1 + 1 - 1))


@pytest.mark.parametrize("name,S,M,R", CASES)
def test_every_operation_runs_once_after_its_inputs(name, S, M, R):
  ops = timeline.simulate(name, S, M, R)
  kinds = ("F", "B", "W") if name == "zb_h1" else ("F", "B")
  assert sorted((o.kind, o.stage, o.microbatch, o.chunk) for o in ops) == sorted(
    (k, s, j, c) for k in kinds for s in range(S) for j in range(M) for c in range(R)
  )
  end = {(o.kind, o.stage, o.microbatch, o.chunk): o.start + o.duration for o in ops}
  for o in ops:
    s, j, c = o.stage, o.microbatch, o.chunk
    if o.kind == "F" and (s > 0 or c > 0):
      assert o.start >= end["F", s - 1, j, c] if s > 0 else o.start >= end["F", S - 1, j, c - 1]
    if o.kind == "B":
      assert o.start >= end["F", s, j, c]
      if s < S - 1:
        assert o.start >= end["B", s + 1, j, c]
      elif c < R - 1:
        assert o.start >= end["B", 0, j, c + 1]
    if o.kind == "W":
      assert o.start >= end["B", s, j, c]
  for s in range(S):  # one operation at a time on each stage
    mine = sorted((o.start, o.start + o.duration) for o in ops if o.stage == s)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(mine, mine[1:]))


@pytest.mark.parametrize("name,S,M,R", CASES)
def test_bubble_from_the_table_is_the_papers(name, S, M, R):
  d = timeline.describe(name, S, M, R)
  assert d["bubble_fraction_table"] == pytest.approx(closed_form(name, S, M, R), rel=1e-12)
  assert d["bubble_fraction_formula"] == pytest.approx(closed_form(name, S, M, R), rel=1e-12)


def test_zero_bubble_is_a_third_of_1f1b_and_holds_no_more():
  for S, M in [(4, 8), (8, 16)]:
    one = timeline.describe("1f1b", S, M)
    zb = timeline.describe("zb_h1", S, M)
    idle = lambda d, work: d["bubble_fraction_table"] / (1 - d["bubble_fraction_table"]) * work
    assert idle(zb, 3 * M) == pytest.approx(idle(one, 3 * M) / 3)  # idle time, same total work
    assert max(zb["peak_in_flight_per_stage"]) == max(one["peak_in_flight_per_stage"]) == S


def test_memory_gpipe_grows_with_microbatches_1f1b_does_not():
  """Activations held per stage: GPipe every microbatch (M R), 1F1B S - s whatever M, interleaved
  bounded by its warm-up, not by M."""
  for M in (4, 8, 16):
    assert timeline.describe("gpipe", 4, M)["peak_in_flight_per_stage"] == [M] * 4
    assert timeline.describe("circular", 4, M, 2)["peak_in_flight_per_stage"] == [2 * M] * 4
    assert timeline.describe("1f1b", 4, M)["peak_in_flight_per_stage"] == [4, 3, 2, 1]
  interleaved = [
    timeline.describe("interleaved_1f1b", 4, M, 2)["peak_in_flight_per_stage"] for M in (8, 16, 32)
  ]
  assert interleaved[0] == interleaved[1] == interleaved[2]
  assert max(interleaved[0]) < 8 * 2  # fewer than GPipe's M R at the smallest M


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="unknown schedule"):
    timeline.simulate("2f2b", 4, 8)


def test_plan_reports_the_table_and_draws_it(shared_data, data_dir, tmp_path):
  c = tiny_config(shared_data, data_dir, layout="pp", pipe=2, data=4)
  c.model.n_heads = 8
  aot_plan.plan(c, str(tmp_path))
  p = json.loads((tmp_path / "plan.json").read_text())["pipeline"]
  assert p["schedule"] == "gpipe"
  assert p["bubble_fraction_table"] == pytest.approx(p["bubble_fraction_theory"], rel=1e-12)
  assert p["peak_in_flight_per_stage"] == [p["microbatches"]] * 2
  assert set(p["other_schedules"]) == {"1f1b", "zb_h1"}
  assert p["other_schedules"]["1f1b"]["peak_in_flight_per_stage"] == [2, 1]
  assert (tmp_path / "pipeline_timeline.png").read_bytes()[:4] == b"\x89PNG"
