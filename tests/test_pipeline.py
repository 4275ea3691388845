"""Pipeline schedules: value and gradient equal the sequential model's, bubbles never leak, the
compiled program's FLOPs and ppermute bytes are what the schedule's formulas say, and the 1F1B
family's memory follows its in-flight microbatches, not M."""

import jax
import numpy as np
import pytest
from helpers import assert_same_gradients, compiled_step, loss_and_gradients, losses, tiny_config
from tolerances import RTOL

from cgpt_jax.costs import analysis, comm
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import pipeline_1f1b
from cgpt_jax.train import loop, setup


def config(
  shared_data,
  data_dir,
  layout="single",
  layers=4,
  schedule="gpipe",
  microbatches=4,
  repeats=1,
  remat="none",
  **sizes,
):
  c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
  c.model.n_layers = layers
  c.model.n_heads = 8
  c.model.remat = remat
  c.pipeline.update(schedule=schedule, microbatches=microbatches, repeats=repeats)
  return c


@pytest.fixture(scope="module")
def sequential(shared_data, data_dir):
  return loss_and_gradients(setup.build(config(shared_data, data_dir), 65))


PIPELINES = {
  "gpipe S4 M4": dict(layout="pp", pipe=4, data=2),
  # M > S: a microbatch waits in stage 0's buffer between repeats.
  "circular S2 R2 M4": dict(layout="pp", pipe=2, data=4, schedule="circular", repeats=2),
  "3d circular": dict(layout="3d", schedule="circular", repeats=2, microbatches=2),
  # Slow: M = S, a microbatch re-enters stage 0 the iteration after it leaves stage S-1.
  "circular S2 R2 M2": dict(
    layout="pp", pipe=2, data=4, schedule="circular", repeats=2, microbatches=2
  ),
  "3d gpipe": dict(layout="3d", microbatches=2),
  # Two blocks per stage, each iteration rematerialised.
  "gpipe x tp, remat": dict(layout="pp", pipe=2, tensor=4, remat="full"),
  # The hand-written backward (pipeline_1f1b.py).
  "1f1b S4 M4": dict(layout="pp", pipe=4, data=2, schedule="1f1b"),
  "interleaved S2 R2 M4": dict(layout="pp", pipe=2, data=4, schedule="interleaved_1f1b", repeats=2),
  "3d zb_h1": dict(layout="3d", schedule="zb_h1", microbatches=2),
  "zb_h1 S4 M4": dict(layout="pp", pipe=4, data=2, schedule="zb_h1"),
  "3d interleaved": dict(layout="3d", schedule="interleaved_1f1b", repeats=2, microbatches=2),
  "1f1b x tp, remat": dict(layout="pp", pipe=2, tensor=4, schedule="1f1b", remat="full"),
  "zb_h1 x tp, remat": dict(layout="pp", pipe=2, tensor=4, schedule="zb_h1", remat="full"),
  "1f1b x fsdp": dict(layout="pp", pipe=2, fsdp=4, schedule="1f1b"),
}
HAND_WRITTEN = [n for n in PIPELINES if PIPELINES[n].get("schedule") in pipeline_1f1b.SCHEDULES]
# With test_layouts' pp and 3d runs, one of each schedule.
FAST = (
  "gpipe S4 M4",
  "circular S2 R2 M4",
  "3d circular",
  "1f1b S4 M4",
  "interleaved S2 R2 M4",
  "3d zb_h1",
)
NAN = float("nan")


def cases(names=PIPELINES):
  return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


_results = {}


def pipelined(shared_data, data_dir, name, bubble_fill):
  """Loss and gradients of a pipeline case, computed once per module."""
  if (name, bubble_fill) not in _results:
    s = setup.build(config(shared_data, data_dir, **PIPELINES[name]), 65)
    assert s.schedule is not None
    _results[name, bubble_fill] = loss_and_gradients(s, bubble_fill)
  return _results[name, bubble_fill]


@pytest.mark.parametrize("name", cases())
def test_pipeline_matches_sequential_with_nan_bubbles(shared_data, data_dir, sequential, name):
  """Every pipeline carry is NaN until real activations reach it. Loss and gradients to the
  suite's float32 tolerance (tolerances.py), as every layout, and all finite: a bubble that reached
  the loss or a gradient would make it NaN."""
  loss, grads = pipelined(shared_data, data_dir, name, NAN)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, sequential[0], rtol=RTOL)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert_same_gradients(grads, sequential[1], name)


@pytest.mark.parametrize("name", ["circular S2 R2 M4", "1f1b S4 M4"])
def test_bubble_contents_do_not_change_a_bit(shared_data, data_dir, name):
  """Zeros (what training uses) or NaN in the bubbles and empty buffer slots: bit-identical loss
  and gradients."""
  loss, grads = pipelined(shared_data, data_dir, name, 0.0)
  nan_loss, nan_grads = pipelined(shared_data, data_dir, name, NAN)
  assert nan_loss == loss
  for g, ref in zip(jax.tree.leaves(nan_grads), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(g, ref)


def head_flops(s) -> int:
  """Forward + backward FLOPs of the tied head over the padded vocabulary (128 rows)."""
  return 6 * 128 * s.cfg.model.d_model * s.cfg.data.global_batch * s.cfg.data.seq_len


@pytest.fixture(scope="module")
def sequential_flops(shared_data, data_dir):
  return analysis.dot_flops(compiled_step(setup.build(config(shared_data, data_dir), 65)).as_text())


@pytest.mark.parametrize(
  "name",
  [
    "3d circular",
    pytest.param("gpipe S4 M4", marks=pytest.mark.slow),
    pytest.param("circular S2 R2 M4", marks=pytest.mark.slow),
  ],
)
def test_compiled_flops_carry_the_bubble(shared_data, data_dir, sequential_flops, name):
  """Every stage computes every one of the M R + S - 1 iterations, so the blocks' compiled FLOPs
  are the single-device program's times (M R + S - 1) / (M R), exactly; the head, split over the
  sequence outside the pipeline, is not inflated."""
  s = setup.build(config(shared_data, data_dir, **PIPELINES[name]), 65)
  ref = sequential_flops
  got = analysis.dot_flops(compiled_step(s).as_text()) * s.layout.mesh.size
  sched = s.schedule
  useful = sched.microbatches * sched.repeats
  assert got * useful == head_flops(s) * useful + (ref - head_flops(s)) * sched.iterations


def test_ppermute_bytes_are_one_activation_per_hop(shared_data, data_dir):
  """Per iteration each device sends its [microbatch rows, seq, d_model] activation forward, and
  its gradient back: 2 (M R + S - 1) (B / data / M) T d 4 bytes, and nothing else permutes."""
  s = setup.build(config(shared_data, data_dir, **PIPELINES["gpipe S4 M4"]), 65)
  measured = analysis.collective_bytes(compiled_step(s).as_text())["collective-permute"]
  d, sched = s.cfg.data, s.schedule
  per_hop = d.global_batch // 2 // sched.microbatches * d.seq_len * s.cfg.model.d_model * 4
  assert measured == 2 * sched.iterations * per_hop


def input_gradient_flops(s) -> int:
  """Matmul FLOPs of the blocks' input gradients over the step: 2 N_layers + 8 L T d per token
  (the backward's d(input) = d(output) W^T products and the attention scores' and values'
  gradients)."""
  m, d = s.cfg.model, s.cfg.data
  per_token = 2 * analysis.layer_matmul_params(m) + 8 * m.n_layers * d.seq_len * m.d_model
  return per_token * d.global_batch * d.seq_len


@pytest.mark.parametrize(
  "name",
  [
    "1f1b S4 M4",
    "3d zb_h1",
    pytest.param("interleaved S2 R2 M4", marks=pytest.mark.slow),
    pytest.param("zb_h1 S4 M4", marks=pytest.mark.slow),
  ],
)
def test_hand_written_schedules_compute_no_bubble(shared_data, data_dir, sequential_flops, name):
  """An idle round runs the switch's empty branch: the compiled FLOPs, counted per branch as
  often as the schedule's table takes it, are the single-device program's exactly. ZB-H1's W
  applies the stage's VJP a second time for the weights, so it adds the whole input-gradient chain
  once more (the price of splitting B from W with two VJPs)."""
  s = setup.build(config(shared_data, data_dir, **PIPELINES[name]), 65)
  shares = s.schedule.program.branch_shares()
  got = analysis.dot_flops(compiled_step(s).as_text(), shares) * s.layout.mesh.size
  extra = input_gradient_flops(s) if s.schedule.name == "zb_h1" else 0
  assert got == sequential_flops + extra


@pytest.mark.parametrize(
  "name",
  [
    "1f1b S4 M4",
    "3d zb_h1",
    pytest.param("interleaved S2 R2 M4", marks=pytest.mark.slow),
    pytest.param("1f1b x tp, remat", marks=pytest.mark.slow),
    pytest.param("zb_h1 x tp, remat", marks=pytest.mark.slow),
    pytest.param("1f1b x fsdp", marks=pytest.mark.slow),
  ],
)
def test_hand_written_schedules_move_the_formulas_bytes(shared_data, data_dir, name):
  """Every round each stage sends one activation on and one gradient back, 2 x rounds messages of
  [mb, T, d] float32 (the lockstep rounds of the table: 2 (M + S - 1) for 1F1B, 3 M + S - 1 for
  ZB-H1); every other collective as comm.py's formula says, within 1%: the scalars' few bytes
  that XLA's partitioner splits differently under tensor x pipe."""
  s = setup.build(config(shared_data, data_dir, **PIPELINES[name]), 65)
  sched, d = s.schedule, s.cfg.data
  rounds = {
    "1f1b": 2 * (sched.microbatches + sched.stages - 1),
    "zb_h1": 3 * sched.microbatches + sched.stages - 1,
  }.get(sched.name)
  if rounds is not None:
    assert sched.program.rounds == rounds
  shares = sched.program.branch_shares()
  measured = analysis.collective_bytes(compiled_step(s).as_text(), branch_shares=shares)
  rows = d.global_batch // (s.layout.axis_sizes["data"] * s.layout.axis_sizes["fsdp"])
  per_hop = rows // sched.microbatches * d.seq_len * s.cfg.model.d_model * 4
  assert measured["collective-permute"] == 2 * sched.program.rounds * per_hop
  analytic = comm.by_kind(comm.analytic_terms(s))
  assert set(measured) == set(analytic), (measured, analytic)
  for kind, value in analytic.items():
    assert measured[kind] == pytest.approx(value, rel=0.01), (kind, measured, analytic)


def temp_bytes(shared_data, data_dir, schedule, microbatches, repeats=1):
  """Per-device temporary memory of the compiled step at S = 4 x data 2, 8 layers, two rows per
  microbatch and device: the batch grows with M."""
  c = config(
    shared_data,
    data_dir,
    layout="pp",
    pipe=4,
    data=2,
    schedule=schedule,
    layers=8,
    microbatches=microbatches,
    repeats=repeats,
  )
  c.data.global_batch = c.data.eval_batch = 2 * 2 * microbatches
  return analysis.compiled_memory(compiled_step(setup.build(c, 65)))["temp_bytes"]


@pytest.mark.parametrize(
  "schedule,repeats",
  [
    ("1f1b", 1),
    pytest.param("zb_h1", 1, marks=pytest.mark.slow),
    pytest.param("interleaved_1f1b", 2, marks=pytest.mark.slow),
  ],
)
def test_memory_follows_in_flight_microbatches_not_m(shared_data, data_dir, schedule, repeats):
  """At S = 4 and a fixed microbatch, M = 4 -> 16: GPipe's backward keeps every microbatch's
  activations (temp memory > 2x), 1F1B and ZB-H1 at most S in flight (within 1.15x of M = 4);
  interleaved holds up to its in-flight count, reached by M = 8. Past that, what grows is less than
  one more microbatch's [mb, T, d] activation: the token rows of the added microbatches."""
  gpipe = [temp_bytes(shared_data, data_dir, "gpipe", m) for m in (4, 16)]
  assert gpipe[1] > 2 * gpipe[0]
  flat_from = 8 if schedule == "interleaved_1f1b" else 4
  ours = {m: temp_bytes(shared_data, data_dir, schedule, m, repeats) for m in {4, flat_from, 16}}
  activation = 2 * 64 * 64 * 4
  assert ours[16] <= 1.15 * ours[4] or schedule == "interleaved_1f1b"
  assert 0 <= ours[16] - ours[flat_from] < activation


@pytest.mark.parametrize(
  "name",
  [
    "1f1b S4 M4",
    pytest.param("interleaved S2 R2 M4", marks=pytest.mark.slow),
    pytest.param("3d zb_h1", marks=pytest.mark.slow),
  ],
)
def test_hand_written_schedules_train_like_single(shared_data, data_dir, tmp_path_factory, name):
  """12 steps from the same seed: single's losses to the suite's float32 tolerance."""
  ref = tmp_path_factory.mktemp("single")
  loop.run(config(shared_data, data_dir), str(ref))
  workdir = tmp_path_factory.mktemp("pipelined")
  summary = loop.run(config(shared_data, data_dir, **PIPELINES[name]), str(workdir))
  assert summary["pipeline"]["schedule"] == PIPELINES[name]["schedule"]
  got, want = losses(workdir), losses(ref)
  np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
  np.testing.assert_allclose(got[1], want[1], rtol=RTOL)


@pytest.mark.parametrize(
  "overrides,phrases",
  [
    (dict(layers=6), ["n_layers=6", "pipe stages x repeats = 4 x 1"]),
    (dict(microbatches=2), ["microbatches=2", "fewer microbatches than the 4 pipe stages"]),
    (dict(microbatches=16), ["global_batch=16", "microbatches x batch devices = 16 x 2 = 32"]),
    (dict(repeats=2), ["repeats=2", "circular and interleaved_1f1b schedules only, not gpipe"]),
    (dict(schedule="1f2b"), ["'1f2b'", "gpipe, circular, 1f1b, interleaved_1f1b, zb_h1"]),
    (dict(schedule="interleaved_1f1b"), ["repeats=1", "R >= 2 chunks"]),
    (
      dict(schedule="interleaved_1f1b", repeats=2, microbatches=6, layers=8),
      ["microbatches=6", "multiple of 4"],
    ),
  ],
)
def test_bad_pipeline_configs_are_clear_errors(shared_data, data_dir, overrides, phrases):
  c = config(shared_data, data_dir, **{**PIPELINES["gpipe S4 M4"], **overrides})
  with pytest.raises(InputError) as e:
    setup.build(c, 65)
  for phrase in phrases:
    assert phrase in str(e.value)
