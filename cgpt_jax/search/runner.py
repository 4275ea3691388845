"""--mode=search: enumerate (space.py), prune (prune.py), rank what is left by the formulas
(rank.analytic_plan), compile the most promising K ahead of time, each in its own launch.py
--mode=plan process under WORKDIR/candidates/NAME/ (sweep.py's machinery, resumable), and rank the
compiled plans by the roofline's step time (rank.step_time). report.py writes the results."""

import copy
import json
import pathlib
import time

import ml_collections

from cgpt_jax import config as config_lib
from cgpt_jax import sweep
from cgpt_jax.costs import roofline
from cgpt_jax.errors import InputError
from cgpt_jax.search import prune, rank, space
from cgpt_jax.train import setup

NEAR_DEVICES = 64  # how far either side of --devices to look for a count that has a layout


def with_overrides(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  c = copy.deepcopy(cfg)
  with c.unlocked():
    c.update_from_flattened_dict(overrides)
  return c


def tensor_cap(hw: roofline.Hardware) -> int:
  return hw.node_size or space.TORUS_TENSOR_CAP


def laid_out(shape: prune.Shape, devices: int, hw: roofline.Hardware) -> bool:
  candidates = space.enumerate_space(devices, shape.batch, tensor_cap(hw))
  return any(prune.divisibility(c, shape) is None for c in candidates)


def check_devices(shape: prune.Shape, devices: int, hw: roofline.Hardware) -> None:
  """An InputError naming the nearest device count with a layout, when `devices` has none."""
  if laid_out(shape, devices, hw):
    return
  for step in range(1, NEAR_DEVICES):
    for n in (devices - step, devices + step):
      if n >= 1 and laid_out(shape, n, hw):
        raise InputError(
          f"--devices={devices}: no layout of this model divides over {devices} devices (heads "
          f"{shape.model.n_heads}, layers {shape.model.n_layers}, batch {shape.batch}, seq "
          f"{shape.seq_len}); the nearest count that has one is --devices={n}."
        )
  raise InputError(f"--devices={devices}: no layout of this model fits any nearby device count.")


def check_budget(estimates: dict, why: dict, budget: float) -> None:
  """An InputError naming the smallest analytic estimate, when nothing fits the budget."""
  if not estimates or any(not why.get(n, "").startswith("memory") for n in estimates):
    return
  name, least = min(estimates.items(), key=lambda kv: kv[1]["total"])
  need = least["total"] / prune.MEMORY_MARGIN / 1e9
  raise InputError(
    f"--memory_budget_gb={budget / 1e9:g}: no candidate fits; the smallest, {name}, needs about "
    f"{least['total'] / 1e9:.1f} GB per device by the analytic model. Use "
    f"--memory_budget_gb={need:.0f} or more, or more --devices."
  )


def analytic_ranking(cfg, vocab: int, survivors: list, hw, why: dict) -> list[tuple]:
  """(estimated step seconds, candidate, step_time dict) of every survivor that setup.build
  accepts, fastest first; one it refuses is pruned with its message."""
  ranked = []
  for c in survivors:
    try:
      s = setup.build(with_overrides(cfg, c.overrides()), vocab)
    except InputError as e:
      why[c.name] = f"invalid: {e}"
      continue
    t = rank.step_time(rank.analytic_plan(s), hw)
    ranked.append((t["step_s"], c, t))
  return sorted(ranked, key=lambda r: (r[0], r[1].name))


def promising(ranked: list[tuple], k: int) -> list:
  """The K fastest, one per mesh first (so that K covers K meshes where it can), then the rest."""
  meshes, first, rest = set(), [], []
  for _, c, _ in ranked:
    (rest if c.mesh in meshes else first).append(c)
    meshes.add(c.mesh)
  return (first + rest)[:k]


def compile_one(c, config_name: str, out: pathlib.Path, devices: int, common: dict, left: float):
  """The candidate's plan.json, or {"error": ...}: from an earlier run when it finished (a failure
  too, kept in error.json), else from a launch.py --mode=plan process given `left` seconds."""
  config_path, arg = sweep.split_config_name(config_name)
  point = sweep.Point(c.name, devices, "plan", arg, c.overrides())
  folder = out / "candidates" / c.name
  if sweep.is_finished(point, folder, common):
    return sweep.load_result(point, folder), True
  if (folder / "error.json").exists() and (folder / "point.json").exists():
    if sweep.read_json(folder / "point.json") == json.loads(json.dumps(point.record(common))):
      return sweep.read_json(folder / "error.json"), True
  result = sweep.launch_point(point, folder, config_path, common, timeout=left)
  # A timeout is the budget's, not the candidate's: it is tried again next time.
  if "error" in result and not result["error"].startswith("exit timeout"):
    (folder / "error.json").write_text(json.dumps(result))
  return result, False


def compile_all(chosen, config_name, out, devices, common, seconds: float) -> dict:
  """{name: plan or error} for the chosen candidates, in order, within `seconds` in all."""
  start, plans = time.perf_counter(), {}
  for i, c in enumerate(chosen, 1):
    left = seconds - (time.perf_counter() - start)
    if left <= 0:
      plans[c.name] = {"error": "not compiled: --search_time_budget spent"}
      continue
    t0 = time.perf_counter()
    plans[c.name], earlier = compile_one(c, config_name, out, devices, common, left)
    status = "error" if "error" in plans[c.name] else "compiled"
    how = "earlier" if earlier else f"in {time.perf_counter() - t0:.0f} s"
    print(f"[{i}/{len(chosen)}] {c.name}: {status} {how}", flush=True)
  return plans


def run(cfg, config_name: str, workdir: str, devices: int, common: dict, options: dict) -> dict:
  """The whole search; `options`: hardware (a --hardware name), budget_gb (None: the HBM), top_k,
  time_budget_s. Every input is checked before anything compiles. Returns search.json's dict."""
  hw = roofline.hardware(options["hardware"])
  budget = options["budget_gb"] * 1e9 if options["budget_gb"] else hw.hbm_bytes
  vocab = cfg.model.vocab_size or setup.load_tokenizer(cfg).vocab_size
  shape = prune.Shape.of(config_lib.resolve(copy.deepcopy(cfg), vocab))
  check_devices(shape, devices, hw)
  candidates = space.enumerate_space(devices, shape.batch, tensor_cap(hw))
  survivors, why, estimates = prune.prune(candidates, shape, budget)
  check_budget(estimates, why, budget)
  out = sweep.claim_folder(workdir, kind="search")
  ranked = analytic_ranking(cfg, vocab, survivors, hw, why)
  chosen = promising(ranked, options["top_k"])
  print(
    f"search: {len(candidates)} candidates, {len(why)} pruned, {len(ranked)} ranked "
    f"analytically, compiling {len(chosen)}",
    flush=True,
  )
  plans = compile_all(chosen, config_name, out, devices, common, options["time_budget_s"])
  from cgpt_jax.search import report  # matplotlib: only once there is something to plot

  result = report.write(
    out, report.Inputs(config_name, devices, hw, budget, candidates, why, estimates, ranked, plans)
  )
  if not result["recommendation"] and result["counts"]["compiled"]:
    least = result["least_compiled_gb"]
    raise InputError(
      f"--memory_budget_gb={budget / 1e9:g}: none of the {len(plans)} compiled candidates fits "
      f"(the smallest needs {least:.1f} GB per device, {out}/report.md); use "
      f"--memory_budget_gb={least:.0f} or more, or more --devices."
    )
  return result
