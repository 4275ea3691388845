"""Pipeline schedules: value and gradient equal the sequential model's, bubbles never leak, and the
compiled program's FLOPs and ppermute bytes are what the schedule's formulas say."""
import jax
import numpy as np
import pytest

from cgpt_jax import analysis, train
from cgpt_jax.errors import InputError

from test_layouts import assert_same_gradients, compiled_step, loss_and_gradients
from test_train import tiny_config
from tolerances import RTOL


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def config(shared_data, data_dir, layout="single", layers=4, schedule="gpipe", microbatches=4,
           repeats=1, remat="none", **sizes):
  c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
  c.model.n_layers = layers
  c.model.n_heads = 8
  c.model.remat = remat
  c.pipeline.update(schedule=schedule, microbatches=microbatches, repeats=repeats)
  return c


@pytest.fixture(scope="module")
def sequential(shared_data, data_dir):
  return loss_and_gradients(train.build(config(shared_data, data_dir), 65))


PIPELINES = {
    "gpipe S4 M4": dict(layout="pp", pipe=4, data=2),
    # M > S: a microbatch waits in stage 0's buffer between repeats.
    "circular S2 R2 M4": dict(layout="pp", pipe=2, data=4, schedule="circular", repeats=2),
    "3d circular": dict(layout="3d", schedule="circular", repeats=2, microbatches=2),
    # Slow: M = S, a microbatch re-enters stage 0 the iteration after it leaves stage S-1.
    "circular S2 R2 M2": dict(layout="pp", pipe=2, data=4, schedule="circular", repeats=2,
                              microbatches=2),
    "3d gpipe": dict(layout="3d", microbatches=2),
    # Two blocks per stage, each iteration rematerialised.
    "gpipe x tp, remat": dict(layout="pp", pipe=2, tensor=4, remat="full"),
}
FAST = ("gpipe S4 M4", "circular S2 R2 M4", "3d circular")  # with test_layouts' pp and 3d runs
NAN = float("nan")


def cases(names=PIPELINES):
  return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


_results = {}


def pipelined(shared_data, data_dir, name, bubble_fill):
  """Loss and gradients of a pipeline case, computed once per module."""
  if (name, bubble_fill) not in _results:
    s = train.build(config(shared_data, data_dir, **PIPELINES[name]), 65)
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


def test_bubble_contents_do_not_change_a_bit(shared_data, data_dir):
  """Zeros (what training uses) or NaN in the bubbles: bit-identical loss and gradients."""
  loss, grads = pipelined(shared_data, data_dir, "circular S2 R2 M4", 0.0)
  nan_loss, nan_grads = pipelined(shared_data, data_dir, "circular S2 R2 M4", NAN)
  assert nan_loss == loss
  for g, ref in zip(jax.tree.leaves(nan_grads), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(g, ref)


def head_flops(s) -> int:
  """Forward + backward FLOPs of the tied head over the padded vocabulary (128 rows)."""
  return 6 * 128 * s.cfg.model.d_model * s.cfg.data.global_batch * s.cfg.data.seq_len


@pytest.fixture(scope="module")
def sequential_flops(shared_data, data_dir):
  return analysis.dot_flops(compiled_step(train.build(config(shared_data, data_dir), 65)).as_text())


@pytest.mark.parametrize("name", ["3d circular", pytest.param("gpipe S4 M4", marks=pytest.mark.slow),
                                  pytest.param("circular S2 R2 M4", marks=pytest.mark.slow)])
def test_compiled_flops_carry_the_bubble(shared_data, data_dir, sequential_flops, name):
  """Every stage computes every one of the M R + S - 1 iterations, so the blocks' compiled FLOPs
  are the single-device program's times (M R + S - 1) / (M R), exactly; the head, split over the
  sequence outside the pipeline, is not inflated."""
  s = train.build(config(shared_data, data_dir, **PIPELINES[name]), 65)
  ref = sequential_flops
  got = analysis.dot_flops(compiled_step(s).as_text()) * s.layout.mesh.size
  sched = s.schedule
  useful = sched.microbatches * sched.repeats
  assert got * useful == head_flops(s) * useful + (ref - head_flops(s)) * sched.iterations


def test_ppermute_bytes_are_one_activation_per_hop(shared_data, data_dir):
  """Per iteration each device sends its [microbatch rows, seq, d_model] activation forward, and
  its gradient back: 2 (M R + S - 1) (B / data / M) T d 4 bytes, and nothing else permutes."""
  s = train.build(config(shared_data, data_dir, **PIPELINES["gpipe S4 M4"]), 65)
  measured = analysis.collective_bytes(compiled_step(s).as_text())["collective-permute"]
  d, sched = s.cfg.data, s.schedule
  per_hop = d.global_batch // 2 // sched.microbatches * d.seq_len * s.cfg.model.d_model * 4
  assert measured == 2 * sched.iterations * per_hop


@pytest.mark.parametrize("overrides,phrases", [
    (dict(layers=6), ["n_layers=6", "pipe stages x repeats = 4 x 1"]),
    (dict(microbatches=2), ["microbatches=2", "fewer microbatches than the 4 pipe stages"]),
    (dict(microbatches=16), ["global_batch=16", "microbatches x batch devices = 16 x 2 = 32"]),
    (dict(repeats=2), ["repeats=2", "circular schedule only"]),
    (dict(schedule="1f1b"), ["'1f1b'", "gpipe, circular"]),
])
def test_bad_pipeline_configs_are_clear_errors(shared_data, data_dir, overrides, phrases):
  c = config(shared_data, data_dir, **{**PIPELINES["gpipe S4 M4"], **overrides})
  with pytest.raises(InputError) as e:
    train.build(c, 65)
  for phrase in phrases:
    assert phrase in str(e.value)
