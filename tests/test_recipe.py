"""Training-recipe knobs: gradient accumulation is the same update as one big step; remat policies
move memory and FLOPs the way they promise (compiled figures, not time)."""
import jax
import numpy as np
import pytest

from cgpt_jax import analysis, model as model_lib, train
from cgpt_jax.errors import InputError

from test_layouts import compiled_step
from test_train import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def one_step(s):
  """Loss, gradient norm and parameters after one optimizer step from the initial state on a fixed
  batch. (Adam's update is invariant to the gradients' scale, so the norm is what shows it.)"""
  batch = np.asarray(next(iter(train.data.train_batches(
      np.arange(10_000, dtype=np.int32) % 65, seq_len=64, global_batch=16, seed=0))))
  state, metrics = train.make_train_step(s)(train.make_init(s)(), batch)
  params = state.params
  if s.schedule:
    params = train.pipeline.from_stages(params)
  return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(params)


@pytest.mark.parametrize("layout,sizes,k", [("single", {}, 4), ("pp", {"pipe": 2, "data": 4}, 2)])
def test_grad_accumulation_is_one_step_on_the_whole_batch(shared_data, data_dir, layout, sizes, k):
  """k micro-steps summed in the scan give the loss, gradient norm and update of one step on all
  16 rows, to float32 rounding."""
  def run(accum):
    c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
    c.train.grad_accum = accum
    c.pipeline.microbatches = 2
    return train.build(c, 65)

  whole, init = one_step(run(1)), jax.device_get(train.make_init(run(1))().params)
  if layout == "pp":
    init = train.pipeline.from_stages(init)
  micro = one_step(run(k))
  np.testing.assert_allclose(micro[0], whole[0], rtol=1e-6)
  np.testing.assert_allclose(micro[1], whole[1], rtol=1e-5)
  for got, ref, start in zip(jax.tree.leaves(micro[2]), jax.tree.leaves(whole[2]),
                             jax.tree.leaves(init)):
    scale = float(np.abs(ref - start).max()) or 1.0
    np.testing.assert_allclose(got - start, ref - start, rtol=0, atol=1e-5 * scale)


def test_remat_policies_trade_memory_for_flops(shared_data, data_dir):
  """none keeps every activation; dots keeps the matmul outputs and recomputes only elementwise
  work, so its matmul FLOPs equal none's exactly; full recomputes each block's forward (less its
  final matmul, see analysis.expected_matmul_flops). Working memory falls in that order."""
  costs = {}
  for policy in model_lib.REMAT_POLICIES | {"none": None}:
    c = tiny_config(shared_data, data_dir, layout="single")
    c.model.remat = policy
    s = train.build(c, 65)
    compiled = compiled_step(s)
    costs[policy] = (analysis.dot_flops(compiled.as_text()),
                     analysis.compiled_memory(compiled)["temp_bytes"],
                     train.compiled_costs(s, compiled)["expected_matmul_flops_per_step"])
  for flops, _, expected in costs.values():
    assert flops == expected
  assert costs["dots"][0] == costs["none"][0] < costs["full"][0]
  assert costs["full"][1] < costs["dots"][1] < costs["none"][1]


def test_grad_accum_that_does_not_divide_the_batch_is_a_clear_error(shared_data, data_dir):
  c = tiny_config(shared_data, data_dir, layout="dp")
  c.train.grad_accum = 4  # 16 rows / 4 micro-steps = 4 rows, not divisible by 8 devices
  with pytest.raises(InputError, match=r"global_batch=16.*4 micro-steps x 8 devices"):
    train.build(c, 65)
  c.train.grad_accum = 3
  with pytest.raises(InputError, match=r"train.grad_accum=3.*divisor of data.global_batch=16"):
    train.build(c, 65)
