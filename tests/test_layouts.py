"""Sharded layouts: the shardings are what each layout promises, and training matches `single`."""

import jax
import numpy as np
import pytest
from helpers import (
  assert_meshes_train_like_single,
  assert_same_gradients,
  compiled_step,
  eight_head_config,
  loss_and_gradients,
  tiny_config,
)
from jax.sharding import PartitionSpec as P
from tolerances import RTOL

from cgpt_jax.costs import analysis, comm
from cgpt_jax.errors import InputError
from cgpt_jax.train import aot_plan, setup

LAYOUTS = ("dp", "zero1", "fsdp")


def setup_for(shared_data, data_dir, layout):
  return setup.build(tiny_config(shared_data, data_dir, layout=layout), 65)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  return sum(
    np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
  )


@pytest.mark.parametrize(
  "layout,param_spec,moment_spec,param_shrink,state_shrink",
  [
    # weight [layers, embed, mlp]: replicated under dp, moments split over data under zero1,
    # weights and moments split along d_model over fsdp.
    ("dp", P(None, None, None), P(None, None, None), 1, 1),
    ("zero1", P(None, None, None), P(None, "data", None), 1, 8),
    ("fsdp", P(None, "fsdp", None), P(None, "fsdp", None), 8, 8),
  ],
)
def test_shardings_are_what_the_layout_promises(
  shared_data, data_dir, layout, param_spec, moment_spec, param_shrink, state_shrink
):
  s = setup_for(shared_data, data_dir, layout)
  single = setup_for(shared_data, data_dir, "single")
  assert s.shardings.params["blocks"]["mlp"]["fc_kernel"].spec == param_spec
  adam = s.shardings.opt_state[1][0]  # chain(clip, adamw) -> adamw -> ScaleByAdamState
  assert adam.mu["blocks"]["mlp"]["fc_kernel"].spec == moment_spec
  assert adam.nu["blocks"]["mlp"]["fc_kernel"].spec == moment_spec
  state, ref = setup.abstract_state(s), setup.abstract_state(single)
  # Every tiny-model tensor with an embed dimension divides by 8; the biases of shapes
  # [layers, 3, heads, head_dim] and [layers, d_ff] (mlp is never on fsdp) stay whole, so the shrink
  # is 8 up to those few bytes.
  blocks = ref.params["blocks"]
  slack = (blocks["attn"]["qkv_bias"].size + blocks["mlp"]["fc_bias"].size) * 4
  assert (
    per_device_bytes(ref.params) / param_shrink
    <= per_device_bytes(state.params)
    <= per_device_bytes(ref.params) / param_shrink + slack
  )
  opt_slack = 2 * slack + 8 * 4  # both moments' biases, plus counters
  assert (
    per_device_bytes(ref.opt_state) / state_shrink
    <= per_device_bytes(state.opt_state)
    <= per_device_bytes(ref.opt_state) / state_shrink + opt_slack
  )


# (layout, axis sizes) on 8 devices; tiny model with 8 heads so that every axis can split it.
MESHES = [
  ("zero1", {}),
  ("fsdp", {}),
  ("tp", {}),
  ("sp", {}),
  ("tp", {"data": 2, "tensor": 4}),  # dp x tp
  ("fsdp", {"fsdp": 2, "tensor": 4}),  # fsdp x tp
  ("pp", {"pipe": 2, "data": 4}),  # GPipe, 4 microbatches, x dp
  ("pp", {"pipe": 2, "fsdp": 4}),  # a stage's weights gathered once per micro-step
  ("3d", {}),  # data 2 x pipe 2 x tensor 2
  ("wafer", {}),  # weight streaming over 8 devices
  ("swarm", {}),  # 2 wafers of 4
]


# Slow (2 min): 12 steps under 15 layouts. The default run keeps every layout's loss and gradients
# at init against single's (below), and dp, the pipelines and the schedules training like single.
@pytest.mark.slow
def test_each_layout_trains_like_single(shared_data, data_dir, tmp_path_factory):
  """Same seed, same data: 12 steps under each layout give single's losses to rtol 1e-5.

  The layouts only change where sums are split and where the update runs: float32 reassociation
  moves a loss by a few ulps per step (dp measured 7.7e-7 relative over 50 steps), while a lost,
  doubled or misplaced reduction moves it by 1e-2 or more.
  """
  assert_meshes_train_like_single(shared_data, data_dir, tmp_path_factory, MESHES)


def test_each_layout_has_single_gradients(shared_data, data_dir):
  ref_loss, ref = loss_and_gradients(
    setup.build(eight_head_config(shared_data, data_dir, "single"), 65)
  )
  for layout, sizes in MESHES:
    loss, got = loss_and_gradients(
      setup.build(eight_head_config(shared_data, data_dir, layout, **sizes), 65)
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg=f"{layout} {sizes}")
    assert_same_gradients(got, ref, f"{layout} {sizes}")


def test_tensor_parallel_shardings(shared_data, data_dir):
  s = setup.build(eight_head_config(shared_data, data_dir, "tp"), 65)
  p = s.shardings.params
  assert p["blocks"]["attn"]["qkv_kernel"].spec == P(None, None, None, "tensor", None)  # column
  assert p["blocks"]["attn"]["out_kernel"].spec == P(None, "tensor", None, None)  # row
  assert p["blocks"]["mlp"]["fc_kernel"].spec == P(None, None, "tensor")  # column
  assert p["blocks"]["mlp"]["proj_kernel"].spec == P(None, "tensor", None)  # row
  assert p["wte"].spec == P("tensor", None)  # vocab-parallel (65 padded to 128 rows)
  sp = setup.build(eight_head_config(shared_data, data_dir, "sp"), 65)
  assert sp.layout.spec(("batch", "residual_seq", "embed")) == P(None, "tensor", None)
  assert s.layout.spec(("batch", "residual_seq", "embed")) == P(None, None, None)


def test_indivisible_dimension_is_a_clear_error(shared_data, data_dir):
  c = tiny_config(shared_data, data_dir, layout="fsdp")
  c.model.d_model = 60  # 60 does not split over 8 devices
  c.model.n_heads = 2
  with pytest.raises(InputError, match=r"'embed' dimension.*8 devices"):
    setup.build(c, 65)


# One of each layout family whose step spmd.py writes out, and the batch that divides under
# train.grad_accum = 4 as well (pp: 4 micro-steps x 4 microbatches x data 4).
FAMILIES = [
  ("dp", {}),
  ("zero1", {}),
  ("fsdp", {}),
  ("tp", {"data": 2, "tensor": 4}),
  ("sp", {"data": 2, "tensor": 4}),
  ("fsdp", {"fsdp": 2, "tensor": 4}),
  ("pp", {"pipe": 2, "data": 4}),
  ("3d", {}),
  ("wafer", {}),
  ("swarm", {}),
]


@pytest.mark.parametrize("grad_accum", [1, 4])
@pytest.mark.parametrize(
  "layout,sizes",
  FAMILIES,
  ids=[f"{l}-" + "-".join(f"{a}{n}" for a, n in z.items()) for l, z in FAMILIES],
)
def test_each_collective_kind_moves_the_formulas_bytes(layout_step, layout, sizes, grad_accum):
  """Bytes per collective kind in the compiled step equal comm.py's algorithm within 1%: dp's
  one all-reduce per gradient per step (not per micro-step), zero1's reduce-scatter and
  all-gather, fsdp's and the wafer's per-layer gathers and scatters once per micro-step, the
  pipelines' hops, entry and exit. A doubled reduction or a gather hoisted out of the micro-steps
  moves a kind by 10% or more."""
  s, compiled = layout_step(layout, sizes, grad_accum)
  measured = analysis.collective_bytes(compiled.as_text())
  terms = comm.analytic_terms(s)
  analytic = comm.by_kind(terms)
  assert set(measured) == set(analytic), (measured, analytic)
  for kind, value in analytic.items():
    assert measured[kind] == pytest.approx(value, rel=0.01), (kind, measured, terms)


# Where the algorithm runs a collective more than once per layer, or in another dtype: remat reruns
# tp's all-reduces ("full") and sp's gathers and scatters (any policy) in the backward, and fsdp's
# gathers of all but the MLP-out bias; a stage of K > scan_unroll layers is a rolled loop whose last
# MLP-out collective reruns too; a pipeline gathers a stage's fsdp weights once per micro-step;
# bfloat16 crosses this CPU's wire as float32 (spmd.wire_dtype); sp gathers the gradient of the
# positions' rows a step uses, not the table's.
VARIANTS = [
  ("tp", {"data": 2, "tensor": 4}, {"remat": "full", "dtype": "bfloat16"}),
  ("tp", {"data": 2, "tensor": 4}, {"remat": "dots"}),
  ("sp", {"data": 2, "tensor": 4}, {"remat": "dots", "n_positions": 128}),  # T = 64 of 128
  ("fsdp", {"fsdp": 2, "tensor": 4}, {"remat": "full"}),
  ("fsdp", {}, {"remat": "dots", "dtype": "bfloat16"}),
  ("3d", {}, {"remat": "full", "n_layers": 8}),
  ("pp", {"pipe": 2, "fsdp": 4}, {}),
  ("pp", {"pipe": 2, "fsdp": 4}, {"remat": "full", "dtype": "bfloat16"}),
]


@pytest.mark.parametrize(
  "layout,sizes,model",
  VARIANTS,
  ids=[
    f"{l}-" + "-".join([f"{a}{n}" for a, n in z.items()] + [f"{v}" for v in m.values()])
    for l, z, m in VARIANTS
  ],
)
def test_remat_pipelines_and_bf16_move_the_formulas_bytes(layout_step, layout, sizes, model):
  s, compiled = layout_step(layout, sizes, model=model)
  by_dtype = analysis.collective_bytes_by_dtype(compiled.as_text())
  measured = {kind: sum(v.values()) for kind, v in by_dtype.items()}
  terms = comm.analytic_terms(s)
  analytic = comm.by_kind(terms)
  assert set(measured) == set(analytic), (measured, analytic)
  for kind, value in analytic.items():
    assert measured[kind] == pytest.approx(value, rel=0.01), (kind, measured, terms)
  assert {d for v in by_dtype.values() for d in v} <= {"f32", "pred"}  # no bf16 on this wire


def test_dp_reduces_each_gradient_once(shared_data, data_dir):
  """dp all-reduces every gradient once: 2 P b (n-1)/n per device (ZeRO paper, sec. 7), the tied
  embedding's lookup and head contributions summed first, plus one scalar (the loss)."""
  s = setup_for(shared_data, data_dir, "dp")
  measured = analysis.collective_bytes(compiled_step(s).as_text())
  held = sum(x.size for x in jax.tree.leaves(s.abstract_params))  # with the padded vocabulary
  assert measured == {"all-reduce": round(2 * held * 4 * 7 / 8 + 2 * 4 * 7 / 8)}


def test_compiled_matmul_flops_are_the_model_flops(shared_data, data_dir):
  """Single device: every dot in the compiled step, once per loop trip, adds up exactly to
  6 N_matmul per token (forward + backward) plus 12 L T d of attention (docs/formulas.md#flops),
  with N counting the head over the padded vocabulary (128 rows for 65 characters)."""
  s = setup_for(shared_data, data_dir, "single")
  m, tokens = s.cfg.model, 16 * 64
  n_matmul = m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff) + 128 * m.d_model
  expected = (6 * n_matmul + 12 * m.n_layers * 64 * m.d_model) * tokens
  assert analysis.dot_flops(compiled_step(s).as_text()) == expected


def test_collectives_in_a_scan_count_once_per_layer(shared_data, data_dir):
  """fsdp gathers each layer's weights inside the layer loop: a rolled scan (a while loop whose
  body appears once in the HLO) must report the same bytes as the fully unrolled program."""

  def fsdp_costs(unroll):
    c = tiny_config(shared_data, data_dir, layout="fsdp")
    c.model.scan_unroll = unroll
    hlo = compiled_step(setup.build(c, 65)).as_text()
    assert ("while(" in hlo) == (unroll == 1)
    return analysis.collective_bytes(hlo), analysis.dot_flops(hlo)

  (rolled, rolled_flops), (unrolled, unrolled_flops) = fsdp_costs(1), fsdp_costs(2)
  assert rolled["all-gather"] > 0
  assert rolled == unrolled
  assert rolled_flops == unrolled_flops


def test_state_memory_matches_the_zero_and_tp_formulas(layout_step):
  """Per-device argument bytes of the compiled step (parameters, moments, batch) against
  docs/formulas.md#per-device-memory: 12 bytes/param (float32 parameter and two Adam moments; the
  gradients are temporaries) split by fsdp, matrices split by tensor, moments also by data under
  zero1. Within 5%: the formula treats small tensors coarsely (the QKV bias is split by heads
  under tp but counted as replicated; it stays whole under fsdp) and leaves out the batch."""
  for layout, sizes in [("single", {}), ("dp", {})] + MESHES:
    s, compiled = layout_step(layout, sizes)
    measured = analysis.compiled_memory(compiled)["argument_bytes"]
    analytic = aot_plan.compiled_costs(s, compiled)["analytic_state_bytes_per_device"]
    assert abs(measured / analytic - 1) < 0.05, (layout, sizes, measured, analytic)
