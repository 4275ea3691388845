"""--mode=search (cgpt_jax/search/, docs/search.md): the enumeration counted by hand, the pruning's
reasons, the ranking's step-time formula on hand-made plans, the analytic memory against the
compiled memory (the pruning margin), the bad-input exits and one tiny search end to end."""

import json

import pytest
from helpers import assert_bad_input, compiled_step, launch, tiny_config

from cgpt_jax import config as config_lib
from cgpt_jax.costs import analysis, roofline
from cgpt_jax.search import prune, rank, space
from cgpt_jax.search.space import Candidate
from cgpt_jax.train import setup

TINY = ["--config=experiments/shakespeare_char.py", "--config.model.preset=tiny"]


def test_meshes_of_8_by_hand():
  # 8 = 2^3 over 5 axes: C(3+4, 4) = 35 ordered factorisations; 5 put pipe and context both > 1
  # (2x2 with the last 2 on data, fsdp or tensor: 3; 2x4 and 4x2: 2), which the ring refuses.
  assert len(space.meshes(8, tensor_cap=8)) == 30
  # tensor <= 2 drops tensor = 4 (the other 2 on one of 4 axes: 4 meshes) and tensor = 8 (1).
  assert len(space.meshes(8, tensor_cap=2)) == 30 - 4 - 1


def test_space_of_2_devices_by_hand():
  # Meshes: one axis 2. Layouts: data 3d+zero1, tensor 3d+sp. k: divisors of the rows a batch
  # shard gets (2 rows unsharded, 1 sharded). Pipelines: 5 schedules x M in {2, 4, 8}. 6 =
  # 2 dtypes x 3 remats. data 2x1x6 + fsdp 1x1x6 + tensor 2x2x6 + context 1x2x6 + pipe 15x2x6.
  assert len(space.enumerate_space(2, batch=2, tensor_cap=8)) == 12 + 6 + 24 + 12 + 180


@pytest.fixture(scope="module")
def shape(shared_data, data_dir):
  return prune.Shape.of(config_lib.resolve(tiny_config(shared_data, data_dir), 65))


def cand(mesh, layout="3d", dtype="bfloat16", remat="full", k=1, schedule=None, m=1, r=1):
  sizes = tuple(mesh.get(a, 1) for a in roofline.AXES)
  return Candidate(sizes, layout, dtype, remat, k, schedule, m, r)


def test_pruning_reasons(shape):
  # The tiny model: 2 layers, 2 heads, d 64, vocab 65 -> 128, seq 64, batch 16.
  assert "2 heads over tensor=4" in prune.divisibility(cand({"tensor": 4, "data": 2}), shape)
  assert "2 layers over pipe" in prune.divisibility(cand({"pipe": 4, "data": 2}, m=4), shape)
  assert "batch 16" in prune.divisibility(cand({"data": 8}, k=4), shape)
  assert "seq 64 over 2 x context" in prune.divisibility(cand({"context": 64}), shape)
  assert prune.divisibility(cand({"data": 2, "tensor": 2, "fsdp": 2}), shape) is None
  survivors, why, _ = prune.prune([cand({"data": 8}, layout="zero1")], shape, budget=1e3)
  assert not survivors and why[cand({"data": 8}, layout="zero1").name].startswith("memory:")
  f32 = cand({"fsdp": 8}, dtype="float32")
  assert (
    prune.dominated(f32) == f"dominated by {cand({'fsdp': 8}).name}: bf16 compute, no more bytes"
  )
  assert prune.dominated(cand({"data": 8})).startswith("dominated by d8p1f1c1t1-zero1")


def test_fewest_fitting_micro_steps_kept(shape):
  twins = [cand({"data": 2, "tensor": 2, "fsdp": 2}, k=k) for k in (1, 2, 4)]
  survivors, why, _ = prune.prune(twins, shape, budget=80e9)
  assert [c.grad_accum for c in survivors] == [1, 2]
  assert why[twins[2].name] == f"dominated by {twins[0].name}: fewer micro-steps, and it fits"


def plan(devices, mesh, flops, terms, model_flops, pipeline=None):
  p = {
    "devices": devices,
    "mesh": {a: mesh.get(a, 1) for a in roofline.AXES},
    "compiled_matmul_flops_per_step": flops,
    "collective_bytes_per_step": {"all-reduce": sum(terms.values())},
    "analytic_collective_terms": terms,
    "accelerator_collective_terms": terms,
    "model_flops_per_step": model_flops,
  }
  if pipeline:
    p["pipeline"] = pipeline
  return p


def test_ranking_by_hand():
  hw, peak = roofline.H100, roofline.H100.peak_flops
  # A: 8 devices, 2 s of compute; 450 GB over tensor 8 inside a node at 450 GB/s: 1 s -> 2 s.
  a = plan(8, {"tensor": 8}, 16 * peak, {"tensor_layers": 450e9}, 8 * peak)
  # B: 16 devices, 1 s of compute; 150 GB over data 16, which leaves the node: 50 GB/s, 3 s.
  b = plan(16, {"data": 16}, 16 * peak, {"gradient_all_reduce": 150e9}, 16 * peak)
  # C: 1F1B over 8 stages, 0.5 s of compute idling half the time: + 0.5 s -> 1 s.
  c = plan(8, {"pipe": 8}, 4 * peak, {"pipeline_hops": 0.0}, 2 * peak)
  c["pipeline"] = {"schedule": "1f1b", "bubble_fraction_theory": 0.5}
  times = {n: rank.step_time(p, hw) for n, p in zip("abc", (a, b, c))}
  assert times["a"]["step_s"] == pytest.approx(2.0) and times["a"]["mfu"] == pytest.approx(0.5)
  assert times["b"]["step_s"] == pytest.approx(3.0) and times["b"]["bound"] == "communication"
  assert times["c"]["bubble_s"] == pytest.approx(0.5) and times["c"]["step_s"] == pytest.approx(1)
  assert sorted(times, key=lambda n: times[n]["step_s"]) == ["c", "a", "b"]
  # gpipe computes through its bubble: nothing is added to the compiled FLOPs' time.
  c["pipeline"]["schedule"] = "gpipe"
  assert rank.step_time(c, hw)["step_s"] == pytest.approx(0.5)
  assert rank.pareto([(1, 3), (2, 2), (3, 1), (3, 3), (2, 2)]) == [True, True, True, False, True]


MARGIN_CANDIDATES = [
  cand({"data": 8}, layout="zero1", remat="none"),
  cand({"fsdp": 4, "tensor": 2}, layout="sp", remat="dots"),
  cand({"data": 4, "pipe": 2}, schedule="1f1b", m=2),
]
MORE_MARGIN_CANDIDATES = [
  cand({"fsdp": 8}, remat="none", k=2),
  cand({"data": 2, "context": 4}, remat="dots"),
  cand({"data": 2, "tensor": 2, "pipe": 2}, schedule="gpipe", m=4, remat="none"),
  cand({"fsdp": 2, "pipe": 2, "tensor": 2}, schedule="zb_h1", m=2),
]


def assert_estimate_within_margin(candidates, shared_data, data_dir, shape):
  """Pruning drops a candidate only when its estimate exceeds MEMORY_MARGIN x the budget, so a
  candidate that fits (compiled <= budget) survives if estimate <= MEMORY_MARGIN x compiled."""
  for c in candidates:
    cfg = tiny_config(shared_data, data_dir)
    cfg.update_from_flattened_dict(c.overrides())
    compiled = analysis.compiled_memory(compiled_step(setup.build(cfg, 65)))["total_bytes"]
    estimate = prune.memory_estimate(c, shape)["total"]
    assert estimate <= prune.MEMORY_MARGIN * compiled, (c.name, estimate, compiled)


def test_memory_estimate_within_margin(shared_data, data_dir, shape):
  assert_estimate_within_margin(MARGIN_CANDIDATES, shared_data, data_dir, shape)


@pytest.mark.slow
def test_memory_estimate_within_margin_more(shared_data, data_dir, shape):
  assert_estimate_within_margin(MORE_MARGIN_CANDIDATES, shared_data, data_dir, shape)


def test_bad_hardware(tmp_path):
  r = launch(*TINY, "--mode=search", "--hardware=h10", f"--workdir={tmp_path / 'w'}", devices=8)
  assert_bad_input(r, "--hardware=h10", "nearest is --hardware=h100")


def test_devices_without_a_layout(tmp_path, data_flags):
  r = launch(*TINY, *data_flags, "--mode=search", f"--workdir={tmp_path / 'w'}", devices=7)
  assert_bad_input(r, "--devices=7", "nearest count that has one is --devices=8")


def test_budget_nothing_fits(tmp_path, data_flags):
  w = tmp_path / "w"
  r = launch(*TINY, *data_flags, "--mode=search", "--memory_budget_gb=1e-6", f"--workdir={w}")
  assert_bad_input(r, "--memory_budget_gb=1e-06", "no candidate fits", "or more")
  assert not w.exists()  # refused before anything was written


# Two searches, one compile (~30 s): the default run keeps one search end to end.
def test_tiny_search_end_to_end(tmp_path, data_flags):
  w = tmp_path / "w"
  args = [*TINY, *data_flags, "--config.data.global_batch=16", "--mode=search", f"--workdir={w}"]
  r = launch(*args, "--search_top_k=1", devices=8)
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads((w / "search.json").read_text())
  assert result["counts"]["compiled"] == 1 and result["recommendation"]
  best = next(c for c in result["candidates"] if c["name"] == result["recommendation"])
  assert best["fits"] and best["memory_analytic_over_compiled"] <= prune.MEMORY_MARGIN
  assert "## Recommendation" in (w / "report.md").read_text() and (w / "pareto.png").exists()
  again = launch(*args, "--search_top_k=1", devices=8)  # resumes: nothing compiles again
  assert "compiled earlier" in again.stdout, again.stdout
