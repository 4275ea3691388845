"""Context parallelism (cgpt_jax/parallel/context.py): the `cp` layout trains like `single`, its
ring moves the formula's bytes and runs the formula's FLOPs, the zig-zag chunks balance the causal
work, a sequence the ring cannot split is refused before compile, and its checkpoints move."""

from fractions import Fraction

import jax
import numpy as np
import pytest
from helpers import (
  SHAKESPEARE,
  assert_bad_input,
  assert_meshes_train_like_single,
  assert_same_gradients,
  by_step,
  copy_checkpoint,
  eight_head_config,
  eight_heads,
  fixed_batch,
  launch,
  loss_and_gradients,
)
from tolerances import RTOL

from cgpt_jax import config as config_lib
from cgpt_jax import run_modes
from cgpt_jax.costs import analysis, comm
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import context
from cgpt_jax.train import aot_plan, loop, setup, step_functions

# Rings of 2, 4 and 8 devices on the 8, and the ring with dp, fsdp, tp, sp, zero1 and the wafer: the
# tiny model with 8 heads, T = 64 in 2N chunks. The first stays in the default run.
MESHES = [
  ("cp", {"context": 4, "data": 2}),
  ("cp", {"context": 2, "data": 4}),
  ("cp", {}),  # context 8
  ("cp", {"context": 4, "fsdp": 2}),
  ("cp", {"context": 2, "tensor": 4}),
  ("cp", {"context": 4, "tensor": 2}),
  ("sp", {"context": 2}),  # tensor 4, the residual stream split over it as well
  ("zero1", {"context": 2}),  # data 4, Adam moments split over it
  ("wafer", {"context": 2}),  # fsdp 4, weights streamed per layer, full remat
]
IDS = [f"{l}-" + "-".join(f"{a}{n}" for a, n in z.items()) for l, z in MESHES]


def default_first(params):
  """The first of `params` in the default run, the rest slow."""
  return [params[0]] + [pytest.param(*p, marks=pytest.mark.slow) for p in params[1:]]


@pytest.fixture(scope="module")
def single(shared_data, data_dir):
  return loss_and_gradients(setup.build(eight_head_config(shared_data, data_dir, "single"), 65))


@pytest.mark.parametrize("layout,sizes", default_first(MESHES), ids=IDS)
def test_ring_has_single_gradients(shared_data, data_dir, single, layout, sizes):
  """Loss and every gradient at init equal single's (tolerances.py): the chunks' positions, the
  ring's causal blocks and online softmax, and the gradients' reduction over context."""
  ref_loss, ref = single
  loss, got = loss_and_gradients(
    setup.build(eight_head_config(shared_data, data_dir, layout, **sizes), 65)
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg=f"{layout} {sizes}")
  assert_same_gradients(got, ref, f"{layout} {sizes}")


# Slow (3 min): 12 steps under each ring; the default run keeps the gradients at init.
@pytest.mark.slow
def test_ring_trains_like_single(shared_data, data_dir, tmp_path_factory):
  """12 steps and two evaluations under each ring give single's losses at every step (RTOL)."""
  summaries = assert_meshes_train_like_single(shared_data, data_dir, tmp_path_factory, MESHES)
  assert all(s["context"]["imbalance_zigzag"] == 1 for s in summaries)


def test_per_token_losses_come_back_in_sequence_order(shared_data, data_dir):
  """Evaluation's per-token losses (perplexity.py) gathered from the zig-zag chunks are single's,
  position by position."""

  def per_token(layout, **sizes):
    s = setup.build(eight_head_config(shared_data, data_dir, layout, **sizes), 65)
    params = setup.make_init(s)().params
    return np.asarray(jax.jit(step_functions.make_loss(s, per_token=True))(params, fixed_batch()))

  np.testing.assert_allclose(per_token("cp", context=4, data=2), per_token("single"), rtol=RTOL)


def assert_formula_bytes(s, compiled):
  """Every collective kind in the compiled step equal to comm.py's terms within 1%."""
  measured = analysis.collective_bytes(compiled.as_text())
  terms = comm.analytic_terms(s)
  analytic = comm.by_kind(terms)
  assert set(measured) == set(analytic), (measured, analytic)
  for kind, value in analytic.items():
    assert measured[kind] == pytest.approx(value, rel=0.01), (kind, measured, terms)
  return measured


def test_ring_moves_the_formulas_bytes_and_skips_masked_blocks(layout_step):
  """context 4 x data 2: the collective-permutes are the ring's K and V, 2 (N-1)/N b T d bytes per
  layer forward and their gradients' as many backward (b = 8 rows a device); the compiled matmul
  FLOPs are single's less the fully masked score blocks: (2N+1)/(4N) of the [T, T] scores."""
  s, compiled = layout_step("cp", {"context": 4, "data": 2})
  measured = assert_formula_bytes(s, compiled)
  m, d, n = s.cfg.model, s.cfg.data, 4
  kv = 2 * (n - 1) / n * (d.global_batch / 2) * d.seq_len * m.d_model * 4 * m.n_layers
  assert 0.97 <= measured["collective-permute"] / (2 * kv) <= 1.03
  tokens = d.global_batch * d.seq_len
  whole = analysis.expected_matmul_flops(m, d.seq_len, tokens, 128)  # single's program
  masked = 12 * m.n_layers * d.seq_len * m.d_model * tokens * (1 - Fraction(2 * n + 1, 4 * n))
  assert analysis.dot_flops(compiled.as_text()) * 8 == whole - masked


# Where the ring runs again or crosses other axes: 8 devices on the ring; tp, whose heads split
# the K and V blocks; fsdp; sp, whose residual stream is split over tensor too (its positions'
# gradient is the device's chunks'); zero1; the wafer, whose full remat reruns the ring; remat,
# whose rerun passes K and V round again ("dots" included: a hop is not a matmul); bfloat16
# (float32 on this CPU's wire); 4 micro-steps.
VARIANTS = [
  ("cp", {}, 1, {}),
  ("cp", {"context": 2, "tensor": 4}, 1, {}),
  ("cp", {"context": 4, "fsdp": 2}, 1, {}),
  ("sp", {"context": 2}, 1, {}),
  ("zero1", {"context": 2}, 1, {}),
  ("wafer", {"context": 2}, 1, {}),
  ("cp", {"context": 4, "data": 2}, 1, {"remat": "full"}),
  ("cp", {"context": 4, "data": 2}, 1, {"remat": "dots", "dtype": "bfloat16"}),
  ("cp", {"context": 4, "data": 2}, 4, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize(
  "layout,sizes,grad_accum,model",
  VARIANTS,
  ids=[
    f"{l}-" + "-".join([f"{a}{n}" for a, n in z.items()] + [f"k{k}", *map(str, m.values())])
    for l, z, k, m in VARIANTS
  ],
)
def test_ring_variants_move_the_formulas_bytes(layout_step, layout, sizes, grad_accum, model):
  s, compiled = layout_step(layout, sizes, grad_accum, model)
  assert_formula_bytes(s, compiled)
  costs = aot_plan.compiled_costs(s, compiled)
  assert costs["compiled_matmul_flops_per_step"] == costs["expected_matmul_flops_per_step"]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zigzag_balances_the_causal_work(n):
  """Query-key pairs under the causal mask per device: equal with chunks i and 2N-1-i; without,
  the last of N contiguous chunks has ((2N-1) m + 1)/(N m + 1) times the mean (m = T/N): about
  2 - 1/N."""
  t = 64 * n
  balanced, contiguous = context.causal_work(n, t), context.causal_work(n, t, zigzag=False)
  assert balanced.sum() == contiguous.sum() == t * (t + 1) // 2
  assert (balanced == balanced[0]).all()
  m = t // n
  assert contiguous.max() / contiguous.mean() == pytest.approx(((2 * n - 1) * m + 1) / (n * m + 1))


def test_indivisible_sequence_is_refused_before_compile(tmp_path, data_flags):
  """T = 60 does not split into 2 x 4 chunks: launch.py exits 2 with one line, nothing written."""
  r = launch(
    SHAKESPEARE,
    *data_flags,
    f"--workdir={tmp_path / 'run'}",
    "--config.mesh.layout=cp",
    "--config.mesh.context=4",
    "--config.mesh.data=2",
    "--config.data.seq_len=60",
    devices=8,
  )
  assert_bad_input(r, "seq_len=60", "2 x mesh.context = 8", "multiple of 8")
  assert not (tmp_path / "run").exists()


def test_a_ring_with_a_pipeline_is_refused(shared_data, data_dir):
  with pytest.raises(InputError, match=r"mesh.context=2\) does not combine with a pipeline"):
    setup.build(eight_head_config(shared_data, data_dir, "cp", context=2, pipe=2, data=2), 65)


# Slow (35 s): three runs, two evaluations and two generations.
@pytest.mark.slow
def test_ring_checkpoint_resumes_evaluates_and_generates_under_another_layout(
  shared_data, data_dir, tmp_path_factory
):
  """Saved under cp at step 4, resumed on one device: steps 5-8 are the cp run's. Its step-8
  checkpoint evaluates and generates under single as under cp (checkpoints are layer-ordered and
  layout-free; context parallelism holds every parameter whole)."""
  ring, resumed = tmp_path_factory.mktemp("cp"), tmp_path_factory.mktemp("single")
  layouts = {"cp": {"context": 4, "data": 2}, "single": {}}
  loop.run(eight_heads(shared_data, data_dir, "cp", **layouts["cp"]), str(ring))
  copy_checkpoint(ring, resumed, 4)
  summary = loop.run(eight_heads(shared_data, data_dir, "single"), str(resumed))
  assert summary["resumed_from_step"] == 4
  ref, got = by_step(ring), by_step(resumed)
  assert sorted(got) == list(range(5, 9))
  np.testing.assert_allclose(
    [got[k]["loss"] for k in got], [ref[k]["loss"] for k in got], rtol=RTOL
  )
  np.testing.assert_allclose(got[8]["eval_loss"], ref[8]["eval_loss"], rtol=RTOL)
  results = {}
  for layout, sizes in layouts.items():
    c = eight_heads(shared_data, data_dir, layout, **sizes)
    c.generate.update(prompt="ROMEO:", max_new_tokens=12, method="greedy")
    results[layout] = run_modes.evaluate(c, str(ring)), run_modes.generate(c, str(ring))
  (cp_eval, cp_sample), (one_eval, one_sample) = results["cp"], results["single"]
  assert cp_eval["step"] == one_eval["step"] == 8
  np.testing.assert_allclose(cp_eval["loss"], one_eval["loss"], rtol=RTOL)
  assert cp_sample["completion"] == one_sample["completion"]


def plan_111m(shared_data, tmp_path, layout: str, layers: int, **sizes):
  """--plan of the 111M widths with T = 8192 tokens (one row) under `layout`."""
  c = config_lib.cerebras_gpt("111m")
  c.data.tokenizer_path = str(shared_data / "gpt2")
  c.data.seq_len = c.model.n_positions = 8192
  c.data.global_batch = 1
  c.model.n_layers = layers
  c.mesh.update(layout=layout, **sizes)
  return aot_plan.plan(c, str(tmp_path / f"{layout}{layers}"))


# Slow (20 s): four plans of the 111M widths at T = 8192.
@pytest.mark.slow
def test_111m_at_8192_tokens_holds_under_a_sixteenth_of_singles_activations(shared_data, tmp_path):
  """context 8 against single, per device: one layer's kept activations (the plans with 10 and 9
  layers apart) at most 1/(2N) of single's, whose [T, T] scores they are mostly; the ring's bytes
  within [0.97, 1.03] of 2 (N-1)/N T d 4 bytes per layer each way; the compiled FLOPs the
  formula's."""
  plans = {
    (layout, layers): plan_111m(shared_data, tmp_path, layout, layers, **sizes)
    for layout, sizes in (("single", {}), ("cp", {"context": 8}))
    for layers in (10, 9)
  }

  def per_layer(layout):
    return (
      plans[layout, 10]["memory_per_device_bytes"]["temp_bytes"]
      - plans[layout, 9]["memory_per_device_bytes"]["temp_bytes"]
    )

  assert per_layer("cp") <= per_layer("single") / 16
  cp = plans["cp", 10]
  kv = 2 * 7 / 8 * 8192 * 768 * 4 * 10
  assert 0.97 <= cp["collective_bytes_per_step"]["collective-permute"] / (2 * kv) <= 1.03
  assert cp["compiled_matmul_flops_per_step"] == cp["expected_matmul_flops_per_step"]
  assert cp["context"]["imbalance_zigzag"] == 1 and cp["context"]["score_blocks_per_device"] == 17
