"""Sweeps (cgpt_jax/sweep.py): get_sweep() points run one process each, failures are reported
without stopping the sweep, reruns skip finished points, and the layout ablation compares every
layout."""

import json
import types

import pytest
from helpers import REPO, experiment, launch

from cgpt_jax import report, sweep
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import layouts


def module_with(points):
  m = types.ModuleType("exp")
  m.__file__ = "exp.py"
  m.get_sweep = lambda arg: points
  return m


@pytest.mark.parametrize(
  "points, phrase",
  [
    ([], "non-empty list"),
    ([{"devices": 2}], "string 'name'"),
    ([{"name": "a/b"}], "not a folder name"),
    ([{"name": "a"}, {"name": "a"}], "two points are named 'a'"),
    ([{"name": "a", "mode": "eval"}], "mode 'eval'"),
    ([{"name": "a", "devices": 0}], "devices=0"),
  ],
)
def test_bad_sweeps_are_refused(points, phrase):
  with pytest.raises(InputError, match=phrase):
    sweep.points(module_with(points), None, default_devices=1)


def test_point_fields_and_command_line_overrides():
  (p,) = sweep.points(
    module_with(
      [{"name": "a", "mode": "plan", "config_arg": "13b", "mesh.layout": "fsdp", "train.steps": 3}]
    ),
    "111m",
    8,
  )
  assert (p.devices, p.mode, p.config_arg) == (8, "plan", "13b")
  assert p.overrides == {"mesh.layout": "fsdp", "train.steps": 3}
  cmd = sweep.command(p, "experiments/x.py", REPO / "w", {"train.steps": 5})
  assert "--config=experiments/x.py:13b" in cmd and "--mode=plan" in cmd and "--nosweep" in cmd
  assert cmd[-2:] == [
    "--config.mesh.layout=fsdp",
    "--config.train.steps=5",
  ]  # the command line wins


def test_ablation_covers_every_layout_on_8_devices():
  points = experiment("ablate_layouts").get_sweep()
  assert points[0]["name"] == "single" and all(p["devices"] == 8 for p in points)
  assert {p["mesh.layout"] for p in points} == set(layouts.LAYOUT_PRESETS)


ABLATE = REPO / "experiments" / "ablate_layouts.py"
SWEEP_FILE = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("ablate", "{ABLATE}")
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)
from cgpt_jax.config import base_config

def get_config(arg=None):
  c = base_config()
  c.model.preset = "char4"
  c.model.n_layers = 2
  c.data.tokenizer = "char"
  c.data.seq_len = 32
  c.data.global_batch = 8
  c.data.eval_batches = 2
  c.train.steps = 4
  c.train.eval_every = 4
  c.optim.warmup_steps = 1
  c.train.log_every = 1
  c.train.progress = False
  c.checkpoint.every = 0
  return c

def get_sweep(arg=None):
  return [{{"name": "single", "devices": 4, "mesh.layout": "single"}},
          {{"name": "fsdp", "devices": 4, "mesh.layout": "fsdp"}},
          {{"name": "tp3", "devices": 4, "mesh.layout": "tp", "mesh.tensor": 3}},
          {{"name": "dp2_x_tp2", "devices": 4, "mesh.layout": "tp", "mesh.data": 2,
            "mesh.tensor": 2}}]

report = ablate.report
"""


def test_sweep_reports_failures_and_resumes(tmp_path, data_flags):
  """Four points, one of them a bad layout: the sweep goes on, the report shows the error and the
  other layouts' losses equal to single's; a rerun skips what finished; a changed point is
  refused."""
  exp = tmp_path / "exp.py"
  exp.write_text(SWEEP_FILE)
  workdir = tmp_path / "sweep"
  r = launch(f"--config={exp}", f"--workdir={workdir}", *data_flags, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  assert lines[0].startswith("[1/4] single (train, 4 devices): done in")
  assert lines[2].startswith("[3/4] tp3") and "FAILED" in lines[2] and "tensor" in lines[2]
  assert lines[3].startswith("[4/4] dp2_x_tp2 (train, 4 devices): done in")

  results = json.loads((workdir / "report.json").read_text())["results"]
  assert "tensor" in results["tp3"]["error"]
  for name in ("fsdp", "dp2_x_tp2"):
    assert results[name]["devices"] == 4
    assert report.max_loss_rdiff(results[name], results["single"]) <= report.LOSS_RTOL
    assert len(results[name]["metrics"]) == 4
  md = (workdir / "report.md").read_text()
  assert "4 points, 1 failed" in md and "| tp3 | error: exit 2: error: " in md
  assert md.count("| yes |") == 3  # single, fsdp and dp2_x_tp2 within the tolerance
  assert (workdir / "layouts.png").stat().st_size > 10_000

  again = launch(f"--config={exp}", f"--workdir={workdir}", *data_flags, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  out = again.stdout.splitlines()
  assert [l.endswith("finished earlier, skipped") for l in out[:4]] == [True, True, False, True]
  assert "FAILED" in out[2]  # a failed point is tried again
  assert json.loads((workdir / "report.json").read_text())["results"]["fsdp"] == results["fsdp"]

  exp.write_text(
    SWEEP_FILE.replace('"mesh.layout": "fsdp"}', '"mesh.layout": "fsdp", "data.seed": 1}')
  )
  changed = launch(f"--config={exp}", f"--workdir={workdir}", *data_flags)
  assert changed.returncode == 2 and "the sweep now defines it differently" in changed.stderr


def test_a_sweep_refuses_several_processes(tmp_path):
  r = launch("--config=experiments/ablate_layouts.py", f"--workdir={tmp_path}", "--processes=2")
  assert r.returncode == 2 and "several processes per point are not supported" in r.stderr
  assert not any(tmp_path.iterdir())
