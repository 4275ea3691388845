"""Faults and bad inputs (issue 15): a diverging run exits 3 and keeps a finite checkpoint, a signal
saves and stops, no folder of someone else's is written into, the tokenizer is part of the model,
and every bad input is one line with exit 2 (none a traceback)."""

import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import (
  REPO,
  SHAKESPEARE,
  assert_bad_input,
  files_digest,
  launch,
  launch_command,
  launch_env,
  losses,
  metrics,
  random_params,
  small_model_cfg,
  tiny_config,
)

from cgpt_jax import checkpoint, data, generate, hf, perplexity, run_modes
from cgpt_jax import config as config_lib
from cgpt_jax.data import text_builder
from cgpt_jax.errors import Diverged, InputError
from cgpt_jax.train import loop, run_dir, run_log, setup, step_functions

# A short run on one device, logged every step.
TINY = [
  SHAKESPEARE,
  "--config.model.preset=tiny",
  "--config.train.progress=False",
  "--config.data.eval_batches=1",
  "--config.train.log_every=1",
  "--config.optim.warmup_steps=1",
  "--config.data.global_batch=8",
]


def config(shared_data, data_dir, **train):
  c = tiny_config(shared_data, data_dir, layout="single")
  c.train.update(train)
  return c


def kept_steps(workdir):
  return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())


def saved_params_finite(workdir, step) -> bool:
  """Whether every array of checkpoint `step` is finite, read as saved (no model needed)."""
  state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return all(
    np.isfinite(np.asarray(x)).all()
    for x in jax.tree.leaves(state)
    if np.issubdtype(np.asarray(x).dtype, np.floating)
  )


# ----------------------------------------------------------------------------------------------
# 1. Non-finite loss or gradients
# ----------------------------------------------------------------------------------------------
def test_a_diverging_run_exits_3_and_keeps_finite_checkpoints(tmp_path, data_flags):
  """lr=1e6 goes non-finite within a few steps. Before: exit 0, and keep=2 rotated every finite
  checkpoint out. Now: exit 3 naming the step, every kept checkpoint finite, --mode=eval reads
  it."""
  run = [
    *TINY,
    *data_flags,
    "--config.optim.lr=1e6",
    "--config.train.steps=30",
    "--config.checkpoint.every=2",
    "--config.checkpoint.keep=2",
    f"--workdir={tmp_path}",
  ]
  r = launch(*run)
  assert r.returncode == 3, r.stderr[-3000:]
  message = r.stderr.strip().splitlines()[-1]
  assert message.startswith("error: step ") and "non-finite" in message, message
  step = int(message.split()[2].rstrip(":"))
  assert "Traceback" not in r.stderr
  kept = kept_steps(tmp_path)
  assert kept and kept[-1] == step - 1 and f"checkpoint {step - 1}" in message
  assert all(saved_params_finite(tmp_path, k) for k in kept)
  assert not (tmp_path / "summary.json").exists()
  evaluated = launch(*run[:-1], "--mode=eval", f"--workdir={tmp_path}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert f"eval (step {step - 1})" in evaluated.stdout


def test_skip_drops_non_finite_updates_and_counts_them(shared_data, data_dir, tmp_path):
  c = config(shared_data, data_dir, on_nonfinite="skip", max_skips=100)
  c.optim.lr = 1e6
  c.checkpoint.every = 4
  summary = loop.run(c, str(tmp_path))
  records = metrics(tmp_path)
  assert summary["skipped_steps"] > 0 and records[-1]["skipped_steps"] == summary["skipped_steps"]
  assert np.isfinite(summary["final_eval_loss"])  # the parameters never took a bad update
  assert all(saved_params_finite(tmp_path, k) for k in kept_steps(tmp_path))
  assert (tmp_path / run_dir.RUN_MARKER).exists()  # a run marks its workdir as this project's


def test_too_many_skips_in_a_row_stop_the_run(shared_data, data_dir, tmp_path):
  c = config(shared_data, data_dir, on_nonfinite="skip", max_skips=2)
  c.optim.lr = 1e6
  with pytest.raises(
    Diverged,
    match=r"steps \d+\.\.\d+ were all non-finite .* more than "
    r"train.max_skips=2 in a row",
  ):
    loop.run(c, str(tmp_path))


def test_keep_finite_keeps_the_old_state():
  old = setup.TrainState(jnp.int32(4), {"w": jnp.ones(3)}, {"m": jnp.zeros(3)})
  new = setup.TrainState(jnp.int32(5), {"w": jnp.array([1.0, jnp.inf, 0.0])}, {"m": jnp.ones(3)})
  metrics = {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0)}
  state, out = step_functions.keep_finite(old, new, metrics)
  assert not out["finite"] and int(state.step) == 5
  np.testing.assert_array_equal(state.params["w"], old.params["w"])
  np.testing.assert_array_equal(state.opt_state["m"], old.opt_state["m"])
  state, out = step_functions.keep_finite(old, new._replace(params={"w": jnp.zeros(3)}), metrics)
  assert out["finite"] and not state.params["w"].any() and state.opt_state["m"].all()


def test_perplexity_overflow_is_inf():
  """lr=100 blows up finitely: exp(loss) overflowed after the final checkpoint (a run that could
  never finish)."""
  assert run_log.perplexity(1e4) == float("inf") and run_log.perplexity(1.0) == pytest.approx(np.e)
  nll = lambda params, rows: jnp.full((rows.shape[0], rows.shape[1] - 1), 1e4)
  result = perplexity.sliding_window_loss(None, nll, np.arange(20), 4, 4, 2)
  assert result["loss"] == pytest.approx(1e4) and result["perplexity"] == float("inf")


def test_eval_generate_and_export_refuse_non_finite_parameters(shared_data, data_dir, tmp_path):
  """A checkpoint written with nan parameters (as runs before the check did) is refused."""
  c = config(shared_data, data_dir, steps=3)
  c.checkpoint.every = 1
  loop.run(c, str(tmp_path))
  c = config(shared_data, data_dir, steps=4)
  tokenizer = setup.load_data(c).tokenizer
  s = setup.build(c, tokenizer.vocab_size)
  ckpt = checkpoint.Checkpointer(
    tmp_path / "checkpoints", s.cfg, data.tokenizer_identity(tokenizer)
  )
  state = setup.restore(s, ckpt, 3, resume=True)
  nan = jax.tree.map(lambda x: x * jnp.nan, state.params)
  ckpt.save(4, setup.TrainState(state.step + 1, nan, state.opt_state), None, force=True)
  ckpt.close()
  for mode in (run_modes.evaluate, run_modes.generate, run_modes.export_hf):
    c = config(shared_data, data_dir, steps=4)
    c.generate.prompt = "ROMEO:"
    with pytest.raises(InputError, match=r"checkpoints/4 holds non-finite parameters"):
      mode(c, str(tmp_path))
  assert not (tmp_path / "hf").exists()


def test_from_hf_refuses_non_finite_weights(tmp_path):
  cfg = small_model_cfg()
  params = random_params(cfg)
  params["wpe"] = params["wpe"].replace(value=params["wpe"][...].at[3, 5].set(jnp.nan))
  hf.export(params, cfg, tmp_path / "model")
  with pytest.raises(InputError, match=r"tensor transformer.wpe.weight holds 1 non-finite"):
    hf.import_params(tmp_path / "model", cfg)


# ----------------------------------------------------------------------------------------------
# 2. Preemption
# ----------------------------------------------------------------------------------------------
def interrupted(run, workdir, signum, after_lines):
  """Runs `run`, sends `signum` once `after_lines` steps are logged; the finished process."""
  proc = subprocess.Popen(
    launch_command("--devices=1", *run),
    cwd=REPO,
    env=launch_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
  while (
    proc.poll() is None
    and time.time() < deadline
    and not (metrics.exists() and len(metrics.read_text().splitlines()) >= after_lines)
  ):
    time.sleep(0.02)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def long_run(data_flags, workdir, steps=150):
  # No periodic checkpoint: what the rerun resumes from is the one the signal saved.
  return [
    *TINY,
    *data_flags,
    f"--config.train.steps={steps}",
    "--config.train.eval_every=100",
    "--config.checkpoint.every=100000",
    f"--workdir={workdir}",
  ]


# Slow: two whole runs (30 s); SIGINT's save-and-exit and the bit-identical rerun stay in the
# default run.
@pytest.mark.slow
def test_sigterm_then_rerun_is_bit_identical(tmp_path, data_flags):
  whole, stopped = tmp_path / "whole", tmp_path / "stopped"
  assert launch(*long_run(data_flags, whole)).returncode == 0
  code, _, err = interrupted(long_run(data_flags, stopped), stopped, signal.SIGTERM, 30)
  assert code == 143, err[-3000:]
  line = err.strip().splitlines()[-1]
  assert line.startswith("stopped by SIGTERM after step ") and "Rerun the same command" in line
  assert "Traceback" not in err
  step = int(line.split()[5].rstrip(";"))
  assert step < 150 and step in kept_steps(stopped)
  rerun = launch(*long_run(data_flags, stopped))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert json.loads((stopped / "summary.json").read_text())["resumed_from_step"] == step
  assert losses(stopped) == losses(whole)  # exact float equality, train and eval


def test_sigint_saves_and_exits_130(tmp_path, data_flags):
  code, _, err = interrupted(long_run(data_flags, tmp_path), tmp_path, signal.SIGINT, 10)
  assert code == 130, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("stopped by SIGINT after step ")
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert kept_steps(tmp_path)[-1] >= 10


@pytest.mark.slow
def test_sigterm_to_a_processes_parent_stops_every_child(tmp_path, data_flags):
  """--processes 2: the parent passes SIGTERM on; both children save after the same step."""
  run = [
    *long_run(data_flags, tmp_path, steps=100000),
    "--config.mesh.layout=fsdp",
    "--processes=2",
  ]
  code, _, err = interrupted(run, tmp_path, signal.SIGTERM, 5)
  assert code == 143, err[-3000:]
  assert "stopped by SIGTERM after step" in err and "Traceback" not in err
  step = kept_steps(tmp_path)[-1]
  assert step >= 5
  records = metrics(tmp_path)
  assert records[-1]["step"] == step


def test_a_run_killed_before_its_summary_is_finished(shared_data, data_dir, tmp_path):
  """Killed after the final checkpoint, before summary.json, with metrics.jsonl's last line cut:
  the rerun writes the summary (before: "Raise train.steps" forever; a JSONDecodeError)."""
  c = config(shared_data, data_dir)
  c.checkpoint.every = 6
  first = loop.run(c, str(tmp_path))
  (tmp_path / "summary.json").unlink()
  whole = (tmp_path / "metrics.jsonl").read_text()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 13, "lo')
  c = config(shared_data, data_dir)
  c.checkpoint.every = 6
  again = loop.run(c, str(tmp_path))
  assert again["resumed_from_step"] == 12 and again["final_loss"] == first["final_loss"]
  assert again["final_eval_loss"] == first["final_eval_loss"]
  assert (tmp_path / "metrics.jsonl").read_text() == whole
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12


def test_a_damaged_metrics_line_before_the_last_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
  with pytest.raises(InputError, match=r"metrics.jsonl: line 2 is not JSON"):
    run_log.read_metrics(path, 2)


# ----------------------------------------------------------------------------------------------
# 3. Never write over something that is not this run's
# ----------------------------------------------------------------------------------------------
def test_a_folder_of_other_files_is_not_trained_into(tmp_path, data_flags):
  """An exported HF folder as the workdir: before, its config.json was overwritten."""
  folder = tmp_path / "hf"
  hf.export(random_params(small_model_cfg()), small_model_cfg(), folder)
  before = files_digest(folder)
  r = launch(*TINY, *data_flags, "--config.train.steps=2", f"--workdir={folder}")
  assert_bad_input(r, "holds files that no run of this project wrote", "config.json")
  assert files_digest(folder) == before


def test_an_empty_workdir_flag_is_refused(data_flags):
  before = sorted(os.listdir(REPO))
  assert_bad_input(launch(*TINY, *data_flags, "--workdir="), "--workdir is empty")
  assert sorted(os.listdir(REPO)) == before


def test_a_refused_run_leaves_no_folder_behind(tmp_path, data_flags):
  assert_bad_input(
    launch(*TINY, *data_flags, "--config.optim.b1=1.5", f"--workdir={tmp_path / 'run'}"),
    "optim.b1=1.5",
  )
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# 4. The tokenizer is part of the model
# ----------------------------------------------------------------------------------------------
def test_another_tokenizer_or_data_order_is_refused(
  shared_data, data_dir, shakespeare_file, tmp_path
):
  """A corpus with as many distinct characters but a different one: before, resume, eval and
  from_hf all went ahead (exit 0) and generated garbage."""
  text = shakespeare_file.read_text()
  assert "~" not in text and "z" in text
  other = tmp_path / "other.txt"
  other.write_text(text.replace("z", "~"))
  run = tmp_path / "run"
  c = config(shared_data, data_dir, steps=3)
  c.checkpoint.every = 1
  loop.run(c, str(run))
  (run / "summary.json").unlink()
  run_modes.export_hf(config(shared_data, data_dir), str(run))
  before = files_digest(run)

  def other_corpus(**train_values):
    c = config(shared_data, data_dir, **train_values)
    c.data.source = str(other)
    return c

  with pytest.raises(InputError, match=r"trained with the tokenizer 'char' \(65 tokens, sha256 "):
    loop.run(other_corpus(steps=5), str(run))
  with pytest.raises(InputError, match=r"tokenizer"):
    run_modes.evaluate(other_corpus(), str(run))
  c = other_corpus(steps=3)
  c.init.from_hf = str(run / "hf")
  with pytest.raises(InputError, match=r"hf/config.json: the model was trained with the 'char' "):
    loop.run(c, str(tmp_path / "fine_tuned"))
  c = config(shared_data, data_dir, steps=5)
  c.data.seed = 1
  with pytest.raises(InputError, match=r"data.seed=0, this run has data.seed=1"):
    loop.run(c, str(run))
  assert files_digest(run) == before
  assert not (tmp_path / "fine_tuned").exists()


# ----------------------------------------------------------------------------------------------
# 5. Value checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "key,value,phrase",
  [
    ("optim.b1", 1.0, "[0, 1)"),
    ("optim.b2", -0.1, "[0, 1)"),
    ("optim.b2", float("nan"), "[0, 1)"),
    ("optim.eps", -1e-8, ">= 0"),
    ("optim.clip_norm", -1.0, "positive"),
    ("optim.weight_decay", -0.1, ">= 0"),
    ("optim.lr", float("inf"), "finite"),
    ("optim.lr", float("nan"), "finite"),
    ("optim.lr", -1e-3, ">= 0"),
    ("model.ln_eps", -1.0, "positive"),
    ("model.ln_eps", 0.0, "positive"),
    ("model.n_positions", 0, "model.n_positions=0: must be positive"),
    ("train.on_nonfinite", "ignore", "stop or skip"),
    ("train.max_skips", 0, ">= 1"),
  ],
)
def test_values_that_diverge_or_mean_nothing_are_refused(key, value, phrase):
  c = config_lib.base_config()
  c.model.preset = "tiny"
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(InputError, match=rf"config {key}=") as error:
    config_lib.resolve(c, 65)
  assert phrase in str(error.value)
  assert "seq_len<=0" not in str(error.value)


def test_a_bad_value_exits_2_before_anything_is_written(tmp_path, data_flags):
  assert_bad_input(
    launch(*TINY, *data_flags, "--config.optim.lr=nan", f"--workdir={tmp_path}"),
    "optim.lr=nan",
    "finite",
  )
  assert not any(tmp_path.iterdir())


def test_too_many_devices_are_refused_before_jax_starts(tmp_path):
  t0 = time.monotonic()
  r = launch(SHAKESPEARE, f"--workdir={tmp_path}", devices=100000, timeout=60)
  assert_bad_input(r, "--devices=100000", "at most")
  assert time.monotonic() - t0 < 30  # before: minutes, while memory grew to 8 GB


def test_a_global_batch_of_one(shakespeare_file, data_dir):
  """grain's slice of an endless one-row batch stream overflowed (OverflowError) before."""
  tokens = data.load_corpus(str(shakespeare_file), str(data_dir), "char").tokens["train"]
  one = data.train_batches(tokens, seq_len=8, global_batch=1, seed=0)
  two = data.train_batches(
    tokens, seq_len=8, global_batch=2, seed=0, process_index=1, process_count=2
  )
  assert next(one).shape == (1, 9) and next(two).shape == (1, 9)


def test_binary_data_needs_a_flag(tmp_path):
  blob = tmp_path / "weights.bin"
  blob.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
  with pytest.raises(InputError, match=r"weights.bin looks binary.*data.allow_binary=True"):
    text_builder.prepare_text_dataset(str(blob), str(tmp_path / "tfds"))
  assert text_builder.prepare_text_dataset(str(blob), str(tmp_path / "tfds"), allow_binary=True)
  latin1 = tmp_path / "old.txt"  # 8-bit text is not binary
  latin1.write_bytes("Caf\xe9 cr\xe8me, \x93quoted\x94.\r\n".encode("latin-1") * 100)
  assert not text_builder.looks_binary(latin1.read_bytes())


# ----------------------------------------------------------------------------------------------
# 6. Tracebacks that should be messages
# ----------------------------------------------------------------------------------------------
GET_CONFIG = """
from cgpt_jax.config import base_config
def get_config(arg=None):
  return base_config()
"""


@pytest.mark.parametrize(
  "body,phrases",
  [
    ("def get_config(:\n", [":1: SyntaxError"]),
    (
      "def get_config(arg=None):\n  raise ValueError('no such size')\n",
      [":2 (in get_config): ValueError: no such size"],
    ),
    (
      "def get_config(arg=None):\n  return {}.missing\n",
      [":2 (in get_config): AttributeError: 'dict' object has no attribute 'missing'"],
    ),
    (
      GET_CONFIG + "def get_sweep(arg=None):\n  return 1 / 0\n",
      ["(in get_sweep): ZeroDivisionError: division by zero"],
    ),
  ],
)
def test_an_experiment_that_fails_is_one_line(tmp_path, body, phrases):
  exp = tmp_path / "exp.py"
  exp.write_text(body)
  r = launch(f"--config={exp}", f"--workdir={tmp_path / 'run'}")
  assert_bad_input(r, str(exp), *phrases, "--verbose")
  verbose = launch(f"--config={exp}", f"--workdir={tmp_path / 'run'}", "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  assert verbose.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_report_that_fails_is_one_line(tmp_path):
  """The sweep's only point fails at once (a bad value); then report() raises."""
  exp = tmp_path / "exp.py"
  exp.write_text(
    GET_CONFIG + "def get_sweep(arg=None):\n  return [{'name': 'a', 'optim.b1': 2}]\n"
    "def report(sweep, results, workdir):\n  raise KeyError('loss')\n"
  )
  r = launch(f"--config={exp}", f"--workdir={tmp_path / 'sweep'}")
  assert_bad_input(r, "(in report): KeyError: 'loss'")


def test_a_missing_config_file(tmp_path):
  assert_bad_input(
    launch(f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path / 'run'}"),
    "nope.py does not exist",
  )


def test_a_damaged_sweep_point_record(tmp_path):
  exp = tmp_path / "exp.py"
  exp.write_text(GET_CONFIG + "def get_sweep(arg=None):\n  return [{'name': 'a'}]\n")
  point = tmp_path / "sweep" / "points" / "a"
  point.mkdir(parents=True)
  (point / "summary.json").write_text("{}")
  (point / "point.json").write_text('{"name": "a", "dev')
  assert_bad_input(
    launch(f"--config={exp}", f"--workdir={tmp_path / 'sweep'}"),
    "point.json cannot be read",
    "Delete the point's folder",
  )


def test_a_damaged_prepared_dataset_names_the_folder(shakespeare_file, tmp_path):
  builder = text_builder.prepare_text_dataset(str(shakespeare_file), str(tmp_path))
  folder = builder.data_dir
  for path in pathlib.Path(folder).glob("*.array_record*"):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(InputError, match=rf"prepared dataset in {folder} cannot be read.*Delete"):
    data.load_corpus(str(shakespeare_file), str(tmp_path), "char")
  (pathlib.Path(folder) / "dataset_info.json").write_text('{"broken')
  with pytest.raises(InputError, match=r"cannot be read \(ParseError.*Delete that folder"):
    data.load_corpus(str(shakespeare_file), str(tmp_path), "char")


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MiB tmpfs (needs root); skipped where it cannot be mounted."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
  ).returncode:
    pytest.skip("cannot mount a tmpfs here")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints(tmp_path, data_flags, small_disk):
  run = [
    *TINY,
    *data_flags,
    "--config.train.steps=30",
    "--config.checkpoint.every=1",
    "--config.checkpoint.keep=50",
    f"--workdir={small_disk / 'run'}",
  ]
  r = launch(*run)
  assert_bad_input(r, "no room for checkpoint", "are intact")
  assert len(r.stderr.strip().splitlines()) < 5  # before: a thousand lines of tracebacks
  kept = kept_steps(small_disk / "run")
  assert kept and all(saved_params_finite(small_disk / "run", k) for k in kept)


# ----------------------------------------------------------------------------------------------
# 7. Messages that were wrong
# ----------------------------------------------------------------------------------------------
def test_a_prompt_longer_than_the_model(tmp_path):
  cfg = small_model_cfg()
  with pytest.raises(InputError, match=r"Shorten the prompt to at most 63 tokens"):
    generate.check_prompt(cfg, np.zeros(100, np.int32), 4)


def test_a_device_file_is_not_called_missing():
  with pytest.raises(InputError, match=r"/dev/null is not a regular file"):
    text_builder.resolve_files("/dev/null")
  with pytest.raises(InputError, match=r"/dev/null: not a folder"):
    hf.read_config("/dev/null")
