"""Sharded layouts: the shardings are what each layout promises, and training matches `single`."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cgpt_jax import mesh as mesh_lib
from cgpt_jax import train
from cgpt_jax.errors import InputError

from test_train import losses, tiny_config

LAYOUTS = ("dp", "zero1", "fsdp")


def setup_for(shared_data, data_dir, layout):
  return train.build(tiny_config(shared_data, data_dir, layout=layout), 65)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  return sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize("layout,param_spec,moment_spec,param_shrink,state_shrink", [
    # weight [layers, embed, mlp]: replicated under dp, moments split over data under zero1,
    # weights and moments split along d_model over fsdp.
    ("dp", P(None, None, None), P(None, None, None), 1, 1),
    ("zero1", P(None, None, None), P(None, "data", None), 1, 8),
    ("fsdp", P(None, "fsdp", None), P(None, "fsdp", None), 8, 8),
])
def test_shardings_are_what_the_layout_promises(shared_data, data_dir, layout, param_spec, moment_spec,
                                                 param_shrink, state_shrink):
  s = setup_for(shared_data, data_dir, layout)
  single = setup_for(shared_data, data_dir, "single")
  assert s.shardings.params["blocks"]["mlp"]["fc_kernel"].spec == param_spec
  adam = s.shardings.opt_state[1][0]  # chain(clip, adamw) -> adamw -> ScaleByAdamState
  assert adam.mu["blocks"]["mlp"]["fc_kernel"].spec == moment_spec
  assert adam.nu["blocks"]["mlp"]["fc_kernel"].spec == moment_spec
  state, ref = train.abstract_state(s), train.abstract_state(single)
  # Every tiny-model tensor with an embed/mlp dimension divides by 8; the biases of shape
  # [layers, 3, heads, head_dim] stay replicated, so the shrink is 8 up to those few bytes.
  qkv_bias = ref.params["blocks"]["attn"]["qkv_bias"]
  slack = qkv_bias.size * 4
  assert per_device_bytes(ref.params) / param_shrink <= per_device_bytes(state.params) \
      <= per_device_bytes(ref.params) / param_shrink + slack
  opt_slack = 2 * slack + 8 * 4  # both moments' biases, plus counters
  assert per_device_bytes(ref.opt_state) / state_shrink <= per_device_bytes(state.opt_state) \
      <= per_device_bytes(ref.opt_state) / state_shrink + opt_slack


def test_each_layout_trains_like_single(shared_data, data_dir, tmp_path_factory):
  """Same seed, same data: 12 steps under each layout give single's losses to rtol 1e-5.

  The layouts only change where rows are summed and where the update runs: float32 reassociation
  over 8 shards moves a loss by a few ulps per step (dp measured 7.7e-7 relative over 50 steps),
  while a lost or doubled reduction moves it by 1e-2 or more.
  """
  ref_dir = tmp_path_factory.mktemp("single")
  train.run(tiny_config(shared_data, data_dir, layout="single"), str(ref_dir))
  ref_train, ref_eval = losses(ref_dir)
  for layout in LAYOUTS[1:]:  # dp is covered in test_train
    workdir = tmp_path_factory.mktemp(layout)
    summary = train.run(tiny_config(shared_data, data_dir, layout=layout), str(workdir))
    assert summary["devices"] == 8
    got_train, got_eval = losses(workdir)
    np.testing.assert_allclose(got_train, ref_train, rtol=1e-5, err_msg=layout)
    np.testing.assert_allclose(got_eval, ref_eval, rtol=1e-5, err_msg=layout)


def test_indivisible_dimension_is_a_clear_error(shared_data, data_dir):
  c = tiny_config(shared_data, data_dir, layout="fsdp")
  c.model.d_model = 60  # 60 does not split over 8 devices
  c.model.n_heads = 2
  with pytest.raises(InputError, match=r"'embed' dimension.*8 devices"):
    train.build(c, 65)


def compiled_step(s):
  batch = jax.ShapeDtypeStruct((s.cfg.data.global_batch, s.cfg.data.seq_len + 1), np.int32,
                               sharding=s.batch_sharding)
  step = train.make_train_step(s.graphdef, s.tx, s.lr_schedule, s.layout, s.shardings, s.batch_sharding)
  return step.lower(train.abstract_state(s), batch).compile()


def test_dp_collective_bytes_match_the_all_reduce_formula(shared_data, data_dir):
  """dp all-reduces every gradient once: 2 P b (n-1)/n per device (REFERENCE.md §2). The tied
  embedding's two partial gradients (lookup and head) are reduced separately, +V d on top."""
  s = setup_for(shared_data, data_dir, "dp")
  measured = sum(train.analysis.collective_bytes(compiled_step(s).as_text()).values())
  analytic = train.analysis.analytic_collective_bytes("dp", s.n_params, 8)
  assert analytic == round(2 * s.n_params * 4 * 7 / 8)
  assert abs(measured / analytic - 1) < 0.15


def test_collectives_in_a_scan_count_once_per_layer(shared_data, data_dir):
  """fsdp gathers each layer's weights inside the layer loop: a rolled scan (a while loop whose
  body appears once in the HLO) must report the same bytes as the fully unrolled program."""
  def fsdp_bytes(unroll):
    c = tiny_config(shared_data, data_dir, layout="fsdp")
    c.model.scan_unroll = unroll
    return train.analysis.collective_bytes(compiled_step(train.build(c, 65)).as_text())

  rolled, unrolled = fsdp_bytes(1), fsdp_bytes(2)
  assert rolled["all-gather"] > 0
  assert rolled == unrolled
