"""The wafer layout: weights stream in one layer at a time, so on-device memory does not grow with
depth, and the streamed bytes are what the analytic model says. (That wafer and swarm train like
single is test_layouts' job: they are in its MESHES.)"""

import json

import pytest
from helpers import PAPER_PARAMS, PAPER_SHAPES, compiled_step, tiny_config

from cgpt_jax.costs import analysis
from cgpt_jax.errors import InputError
from cgpt_jax.train import aot_plan, setup


def wafer_setup(shared_data, data_dir, layout, layers=2, **sizes):
  c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
  c.model.n_layers = layers
  c.model.n_heads = 8
  c.model.scan_unroll = 1
  return setup.build(c, 65)


def test_working_memory_stays_flat_in_depth(shared_data, data_dir):
  """2 -> 16 layers. dp holds every layer's weights, moments and activations on each device: its
  memory grows about as the layer count. The wafer's working set (temp: activations plus the one
  layer streamed in) grows only by a saved [batch, seq, d] input per layer; the state is the
  sharded off-wafer store (arguments), 1/8 per device."""

  def memory(layout, layers):
    return analysis.compiled_memory(
      compiled_step(wafer_setup(shared_data, data_dir, layout, layers))
    )

  dp2, dp16 = memory("dp", 2), memory("dp", 16)
  wafer2, wafer16 = memory("wafer", 2), memory("wafer", 16)
  assert dp16["total_bytes"] > 5 * dp2["total_bytes"]
  assert wafer16["temp_bytes"] < 1.5 * wafer2["temp_bytes"]
  assert wafer16["argument_bytes"] < dp16["argument_bytes"] / 7


@pytest.mark.parametrize("layout,wafers", [("wafer", 1), ("swarm", 2)])
def test_streamed_bytes_match_the_analytic_value(shared_data, data_dir, layout, wafers):
  """Inside the layer scan each layer's weights are gathered in twice (forward, and again in the
  rematerialised backward) and its gradient reduce-scattered out once. So the gathers are twice the
  reduce-scatters, less one tensor: the MLP-out bias, which the backward never needs (it does not
  recompute the layer's output). Together they are 3 P_layers b (n-1)/n to within 1%: the QKV
  bias [3, heads, head_dim] has no d_model dimension, stays whole on every device and is summed
  once at the end instead (0.4% of a layer at d = 64)."""
  s = wafer_setup(shared_data, data_dir, layout)
  assert s.layout.axis_sizes["data"] == wafers
  compiled = compiled_step(s)
  loops = analysis.collective_bytes(compiled.as_text(), loops_only=True)
  n = s.layout.axis_sizes["fsdp"]
  m = s.cfg.model
  proj_bias = m.n_layers * m.d_model * 4 * (n - 1) // n
  assert loops["all-gather"] == 2 * loops["reduce-scatter"] - proj_bias
  costs = aot_plan.compiled_costs(s, compiled)["wafer"]
  assert costs["streamed_bytes_per_step"] == pytest.approx(
    costs["analytic_streamed_bytes_per_step"], abs=2
  )
  closed_form = 3 * m.n_layers * analysis.layer_params(m) * 4 * (n - 1) / n
  assert abs(costs["streamed_bytes_per_step"] / closed_form - 1) < 0.01


def test_plan_reports_cs2_streaming_for_every_size(shared_data, data_dir, tmp_path):
  """Each published size at its published batch, recomputed by hand from outside figures: the
  model cards' parameter counts and the paper's shapes and batches (helpers.py); 6 bytes per
  parameter streamed (16-bit weights in for the forward and again for the backward, 16-bit
  gradients out) over the CS-2's 12 x 100 GbE (datasheet: 1.2 Tb/s = 150 GB/s); compute of
  6 N_matmul + 12 L T d FLOPs per token (N_matmul = 12 L d^2 + V d, GPT-2's V = 50257, T = 2048)
  at a CS-2's share of Andromeda's 120 PFLOP/s over 16 CS-2s."""
  c = tiny_config(shared_data, data_dir, layout="wafer")
  c.model.n_heads = 8
  result = aot_plan.plan(c, str(tmp_path))
  rows = json.loads((tmp_path / "plan.json").read_text())["cs2_streaming"]
  assert [r["model"] for r in rows] == list(PAPER_PARAMS)
  io_bytes_per_s, peak_flops, seq = 12 * 100e9 / 8, 120e15 / 16, 2048
  for r in rows:
    name, params = r["model"], PAPER_PARAMS[r["model"]]
    layers, d, batch = PAPER_SHAPES[name]
    flops_per_token = 6 * (12 * layers * d**2 + 50257 * d) + 12 * layers * seq * d
    stream_s = 6 * params / io_bytes_per_s
    compute_s = flops_per_token * batch * seq / peak_flops
    assert (r["params"], r["batch"], r["tokens_per_step"]) == (params, batch, batch * seq), name
    assert r["stream_bytes_per_step"] == 6 * params, name
    assert r["stream_s"] == pytest.approx(stream_s, rel=1e-12), name
    assert r["compute_s_at_peak"] == pytest.approx(compute_s, rel=1e-12), name
    assert r["compute_over_stream"] == pytest.approx(compute_s / stream_s, rel=1e-12), name
    assert r["bound"] == "compute", name  # every size: 6.2x (111m) to 46x (6.7b) the streaming
  assert result["wafer"]["mode"]


def test_wafer_with_tensor_parallelism_is_refused(shared_data, data_dir):
  with pytest.raises(InputError, match="no pipeline or tensor parallelism"):
    wafer_setup(shared_data, data_dir, "wafer", fsdp=4, tensor=2)
