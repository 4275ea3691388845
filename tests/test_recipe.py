"""Training-recipe knobs: gradient accumulation is the same update as one big step; remat policies
move memory and FLOPs the way they promise (compiled figures, not time); Adafactor, muP and bf16
train alike under every layout; Adafactor's state is factored; bf16 tracks float32 with less
memory."""

import math

import jax
import numpy as np
import pytest
from helpers import compiled_step, tiny_config
from jax.sharding import PartitionSpec as P

from cgpt_jax import data
from cgpt_jax import model as model_lib
from cgpt_jax.costs import analysis
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import pipeline
from cgpt_jax.train import aot_plan, setup, step_functions


def one_step(s):
  """Loss, gradient norm and parameters after one optimizer step from the initial state on a fixed
  batch. (Adam's update is invariant to the gradients' scale, so the norm is what shows it.)"""
  batch = np.asarray(
    next(
      iter(
        data.train_batches(
          np.arange(10_000, dtype=np.int32) % 65, seq_len=64, global_batch=16, seed=0
        )
      )
    )
  )
  state, metrics = step_functions.make_train_step(s)(setup.make_init(s)(), batch)
  params = state.params
  if s.schedule:
    params = pipeline.from_stages(params, s.schedule)
  return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(params)


@pytest.mark.parametrize("layout,sizes,k", [("single", {}, 4), ("pp", {"pipe": 2, "data": 4}, 2)])
def test_grad_accumulation_is_one_step_on_the_whole_batch(shared_data, data_dir, layout, sizes, k):
  """k micro-steps summed in the scan give the loss, gradient norm and update of one step on all
  16 rows, to float32 rounding."""

  def run(accum):
    c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
    c.train.grad_accum = accum
    c.pipeline.microbatches = 2
    return setup.build(c, 65)

  whole, init = one_step(run(1)), jax.device_get(setup.make_init(run(1))().params)
  if layout == "pp":
    init = pipeline.from_stages(init, run(1).schedule)
  micro = one_step(run(k))
  np.testing.assert_allclose(micro[0], whole[0], rtol=1e-6)
  np.testing.assert_allclose(micro[1], whole[1], rtol=1e-5)
  for got, ref, start in zip(
    jax.tree.leaves(micro[2]), jax.tree.leaves(whole[2]), jax.tree.leaves(init)
  ):
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
    s = setup.build(c, 65)
    compiled = compiled_step(s)
    costs[policy] = (
      analysis.dot_flops(compiled.as_text()),
      analysis.compiled_memory(compiled)["temp_bytes"],
      aot_plan.compiled_costs(s, compiled)["expected_matmul_flops_per_step"],
    )
  for flops, _, expected in costs.values():
    assert flops == expected
  assert costs["dots"][0] == costs["none"][0] < costs["full"][0]
  assert costs["full"][1] < costs["dots"][1] < costs["none"][1]


def test_grad_accum_that_does_not_divide_the_batch_is_a_clear_error(shared_data, data_dir):
  c = tiny_config(shared_data, data_dir, layout="dp")
  c.train.grad_accum = 4  # 16 rows / 4 micro-steps = 4 rows, not divisible by 8 devices
  with pytest.raises(InputError, match=r"global_batch=16.*4 micro-steps x 8 devices"):
    setup.build(c, 65)
  c.train.grad_accum = 3
  with pytest.raises(InputError, match=r"train.grad_accum=3.*divisor of data.global_batch=16"):
    setup.build(c, 65)


# ----------------------------------------------------------------------------------------------
# Adafactor, muP and bfloat16 across layouts
# ----------------------------------------------------------------------------------------------
def first_losses(s, steps=4):
  """Losses of the first `steps` steps on the real corpus, in process (no run directory)."""
  corpus = setup.load_data(s.cfg)
  batches = data.train_batches(corpus.tokens["train"], seq_len=64, global_batch=16, seed=0)
  state, step, losses = setup.make_init(s)(), step_functions.make_train_step(s), []
  for _ in range(steps):
    state, metrics = step(state, np.asarray(next(batches)))
    losses.append(float(metrics["loss"]))
  return np.array(losses)


def recipe_config(shared_data, data_dir, layout, **sizes):
  c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
  c.model.n_heads = 8  # so tp can split heads over 8 devices
  return c


LAYOUTS = [("fsdp", {}), ("tp", {}), ("pp", {"pipe": 2, "data": 4})]


@pytest.fixture(scope="module")
def adafactor_mup_reference(shared_data, data_dir):
  c = recipe_config(shared_data, data_dir, "single")
  c.optim.name, c.model.mup = "adafactor", True
  return first_losses(setup.build(c, 65))


@pytest.mark.parametrize("layout,sizes", LAYOUTS)
def test_adafactor_with_mup_trains_alike_under_every_layout(
  shared_data, data_dir, adafactor_mup_reference, layout, sizes
):
  """The factored moments and the muP multi-transform are sharded state and labels like any other:
  float32 losses equal single's to the layouts' tolerance (test_layouts)."""
  c = recipe_config(shared_data, data_dir, layout, **sizes)
  c.optim.name, c.model.mup = "adafactor", True
  np.testing.assert_allclose(first_losses(setup.build(c, 65)), adafactor_mup_reference, rtol=1e-5)


def test_adafactor_state_is_factored(shared_data, data_dir):
  """Adafactor keeps, for every parameter whose two largest dims are both >= 128, a row and a column
  mean of its squared gradients instead of Adam's two full moments (Shazeer & Stern 2018), and the
  factored moments shard along the parameter axes they keep."""

  def make_setup(layout, name):
    c = recipe_config(shared_data, data_dir, layout)
    c.model.update(d_model=128, n_positions=256)  # wte [128, 128], wpe [256, 128], fc [2, 128, 512]
    c.optim.name = name
    return setup.build(c, 65)

  def moment_bytes(s):  # counters and optax's (1,) placeholders left out
    return sum(x.size * 4 for x in jax.tree.leaves(setup.abstract_state(s).opt_state) if x.size > 1)

  def adafactor_elements(shape):
    big = sorted(shape)[-2:]
    if len(shape) >= 2 and big[0] >= 128:
      return math.prod(shape) // big[1] + math.prod(shape) // big[0]
    return math.prod(shape)

  adam, adafactor = make_setup("single", "adamw"), make_setup("single", "adafactor")
  shapes = [x.shape for x in jax.tree.leaves(adam.abstract_params)]
  assert moment_bytes(adam) == 2 * 4 * sum(math.prod(s) for s in shapes)
  assert moment_bytes(adafactor) == 4 * sum(adafactor_elements(s) for s in shapes)
  assert moment_bytes(adam) / moment_bytes(adafactor) > 2.5  # the attention kernels stay full
  # The analysis reports the same bytes, whole and per device.
  costs = aot_plan.compiled_costs(adafactor, compiled_step(adafactor))
  assert costs["optimizer_state_bytes"] == analysis.tree_bytes(
    setup.abstract_state(adafactor).opt_state
  )

  # v_col keeps [layers, mlp], and mlp is never split over fsdp (layouts.RULES): whole there.
  for layout, row, col in (
    ("fsdp", P(None, "fsdp"), P(None, None)),
    ("tp", P(None, None), P(None, "tensor")),
  ):
    s = make_setup(layout, "adafactor")
    factored = s.shardings.opt_state[1][0]  # chain(clip, adafactor) -> adafactor's FactoredState
    fc = "blocks", "mlp", "fc_kernel"  # [layers, embed, mlp]: v_row drops mlp, v_col drops embed
    assert factored.v_row[fc[0]][fc[1]][fc[2]].spec == row, layout
    assert factored.v_col[fc[0]][fc[1]][fc[2]].spec == col, layout


@pytest.fixture(scope="module")
def bf16_reference(shared_data, data_dir):
  c = recipe_config(shared_data, data_dir, "single")
  c.model.dtype = "bfloat16"
  return first_losses(setup.build(c, 65))


@pytest.mark.parametrize(
  "layout,sizes",
  [
    pytest.param(*LAYOUTS[0], marks=pytest.mark.slow),
    pytest.param(*LAYOUTS[1], marks=pytest.mark.slow),
    LAYOUTS[2],  # the pipeline carries float32 across devices (pipeline.py): the default run
  ],
)
def test_bfloat16_trains_alike_under_every_layout(
  shared_data, data_dir, bf16_reference, layout, sizes
):
  """bf16 rounds partial sums at different points in each layout (unit roundoff 2^-9 per value,
  averaged over the batch's 1024 tokens in the loss): rtol 1e-4, not float32's 1e-5."""
  c = recipe_config(shared_data, data_dir, layout, **sizes)
  c.model.dtype = "bfloat16"
  np.testing.assert_allclose(first_losses(setup.build(c, 65)), bf16_reference, rtol=1e-4)


# Slow: two 20-step runs (19 s); bf16 under every layout stays in the default run.
@pytest.mark.slow
def test_bfloat16_tracks_float32_and_saves_memory(shared_data, data_dir):
  """40 steps: the bf16 loss curve stays within 1e-3 (relative) of float32's, and compiled memory
  shows master weights and optimizer state unchanged (float32 arguments) with smaller
  activations (temp), under single and fsdp."""

  def make_setup(layout, dtype, steps=40):
    c = recipe_config(shared_data, data_dir, layout)
    c.model.dtype = dtype
    c.train.steps = steps
    return setup.build(c, 65)

  f32, bf16 = (
    first_losses(make_setup("single", "float32"), 40),
    first_losses(make_setup("single", "bfloat16"), 40),
  )
  assert f32[-1] < f32[0] - 0.5  # it learns
  np.testing.assert_allclose(bf16, f32, rtol=1e-3)
  for layout in ("single", "fsdp"):
    mem = {
      dtype: analysis.compiled_memory(compiled_step(make_setup(layout, dtype)))
      for dtype in ("float32", "bfloat16")
    }
    assert mem["bfloat16"]["argument_bytes"] == mem["float32"]["argument_bytes"], layout
    assert mem["bfloat16"]["temp_bytes"] < 0.9 * mem["float32"]["temp_bytes"], layout
