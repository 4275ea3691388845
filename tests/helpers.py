"""Plain functions and constants that several test modules share: the repository's paths, the
experiment files, the tiny training config, launch.py in a subprocess, the run files' readers and
the compiled step. Fixtures live in conftest.py, float tolerances in tolerances.py.

Imported after conftest.py has set up the 8 virtual devices (pytest imports conftest.py first)."""

import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tolerances import GRAD_ATOL, RTOL

from cgpt_jax import config as config_lib
from cgpt_jax import data
from cgpt_jax import model as model_lib
from cgpt_jax.parallel import pipeline
from cgpt_jax.train import loop, setup, step_functions

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = "--config=experiments/shakespeare_char.py"

# The seven Cerebras-GPT sizes as published, outside facts to test the code against.
# Exact parameter counts from the Cerebras-GPT model cards (docs/cerebras_gpt.md#model-family).
PAPER_PARAMS = {
  "111m": 111_050_496,
  "256m": 255_977_024,
  "590m": 590_310_912,
  "1.3b": 1_315_723_264,
  "2.7b": 2_651_553_280,
  "6.7b": 6_658_404_352,
  "13b": 12_853_386_240,
}
# (layers, d_model, batch in 2048-token sequences): the Cerebras-GPT paper's model shapes and
# training batches (Dey et al., arXiv 2304.03208; docs/cerebras_gpt.md#model-family; 13B's is the
# batch it started with, which the preset keeps).
PAPER_SHAPES = {
  "111m": (10, 768, 120),
  "256m": (14, 1088, 264),
  "590m": (18, 1536, 264),
  "1.3b": (24, 2048, 528),
  "2.7b": (32, 2560, 528),
  "6.7b": (32, 4096, 1040),
  "13b": (40, 5120, 720),
}


@functools.cache
def experiment(name: str) -> ModuleType:
  """experiments/NAME.py, loaded from its file (experiments/ is not a package), once per process."""
  path = REPO / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(shared_data, data_dir, **mesh):
  """The default experiment with the tiny model: 12 steps of batch 16 on tiny Shakespeare."""
  c = experiment("shakespeare_char").get_config()
  c.model.preset = "tiny"
  c.model.scan_unroll = 2
  c.data.source = str(shared_data / "tinyshakespeare" / "input.txt")
  c.data.data_dir = str(data_dir)
  c.data.global_batch = 16
  c.data.eval_batch = 64
  c.data.eval_batches = 4
  c.train.steps = 12
  c.train.log_every = 1
  c.train.eval_every = 6
  c.train.progress = False
  c.optim.warmup_steps = 2
  c.mesh.update(mesh)
  return c


# --- a run's files --------------------------------------------------------------------------------


def metrics(workdir) -> list[dict]:
  """WORKDIR/metrics.jsonl, one dict per line."""
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir):
  """(every logged training loss, every eval loss) of a run."""
  lines = metrics(workdir)
  return [l["loss"] for l in lines], [l["eval_loss"] for l in lines if "eval_loss" in l]


def files_digest(folder):
  """One hash of every file's path and bytes under `folder`: equal when nothing was written."""
  h = hashlib.sha256()
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
  return h.hexdigest()


# --- launch.py as a user runs it ------------------------------------------------------------------


def launch_env() -> dict:
  """The suite's environment less XLA_FLAGS: launch.py sets the device count itself."""
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def launch_command(*args) -> list[str]:
  return [sys.executable, str(REPO / "launch.py"), *args]


def launch(*args, devices: int | None = 1, timeout=300):
  """launch.py ARGS in the repository, finished; `--devices=DEVICES` first unless None."""
  flags = [f"--devices={devices}"] if devices is not None else []
  return subprocess.run(
    launch_command(*flags, *args),
    cwd=REPO,
    env=launch_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def assert_bad_input(result, *phrases):
  """Exit 2 with one `error: ...` line holding every phrase, and no traceback."""
  assert result.returncode == 2, result.stderr[-2000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("error: "), result.stderr[-2000:]
  for phrase in phrases:
    assert phrase in message, message
  assert "Traceback" not in result.stderr


# --- models and compiled steps --------------------------------------------------------------------

# A small model whose vocabulary (65) is padded to 128 rows, so that the padding is exercised.
SMALL_SHAPE = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=65, n_positions=64)


def small_model_cfg(**overrides):
  c = config_lib.base_config().model
  c.update({**SMALL_SHAPE, **overrides})
  config_lib.resolve_model(c)
  return c


def random_params(cfg, seed=0):
  """Parameters of `cfg`'s GPT with every entry random (biases and norms too, so that a swapped
  tensor shows; norm scales near 1, so that logits are O(1)), except the embedding table's padding
  rows, which stay zero. Drawn with numpy on the abstract tree: initialising the real model costs
  seconds of compiles."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    return jnp.asarray(rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.1, shape), jnp.float32)

  flat = [
    (p, v.replace(value=draw(p, v.shape)))
    for p, v in nnx.to_flat_state(model_lib.abstract_model(cfg)[1])
  ]
  params = nnx.from_flat_state(flat)
  params["wte"] = params["wte"].replace(value=params["wte"][...].at[cfg.vocab_size :].set(0))
  return params


def compiled_step(s):
  """The train step of Setup `s`, compiled ahead of time from abstract shapes."""
  batch = jax.ShapeDtypeStruct(
    (s.cfg.data.global_batch, s.cfg.data.seq_len + 1), np.int32, sharding=s.batch_sharding
  )
  return step_functions.make_train_step(s).lower(setup.abstract_state(s), batch).compile()


def fixed_batch():
  """One batch [16, 65] of a fixed token stream: what the at-init comparisons compute on."""
  return np.asarray(
    next(
      iter(
        data.train_batches(
          np.arange(10_000, dtype=np.int32) % 65, seq_len=64, global_batch=16, seed=0
        )
      )
    )
  )


def loss_and_gradients(s, bubble_fill=0.0):
  """Loss and gradients at initialisation on one fixed batch, as the train step computes them
  (each gradient reduced into its optimizer state's sharding); pipeline gradients in layer order."""
  state = setup.make_init(s)()
  batch = fixed_batch()
  f = jax.jit(
    step_functions.make_gradients(s, bubble_fill),
    in_shardings=(s.shardings.params, s.batch_sharding),
  )
  loss, grads = f(state.params, batch)
  if s.schedule:
    grads = pipeline.from_stages(grads, s.schedule)
  return float(loss), jax.device_get(grads)


def assert_same_gradients(got, ref, msg):
  """Equal to GRAD_ATOL of the largest gradient of each tensor (tolerances.py)."""
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
    scale = float(np.abs(r).max()) or 1.0
    np.testing.assert_allclose(
      g, r, rtol=0, atol=GRAD_ATOL * scale, err_msg=f"{msg} {jax.tree_util.keystr(path)}"
    )


def eight_head_config(shared_data, data_dir, layout, **sizes):
  c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
  c.model.n_heads = 8
  return c


def eight_heads(shared_data, data_dir, layout, **sizes):
  c = tiny_config(shared_data, data_dir, layout=layout, **sizes)
  c.model.n_heads = 8  # tp splits heads over 8 devices
  c.train.steps = 8
  c.checkpoint.every = 4
  return c


def by_step(workdir):
  return {l["step"]: l for l in metrics(workdir)}


def copy_checkpoint(src, dst, step):
  """A workdir holding only `src`'s checkpoint at `step`."""
  shutil.copytree(src / "checkpoints", dst / "checkpoints")
  for other in (dst / "checkpoints").iterdir():
    if other.is_dir() and other.name.isdigit() and int(other.name) != step:
      shutil.rmtree(other)


def assert_meshes_train_like_single(shared_data, data_dir, tmp_path_factory, meshes) -> list[dict]:
  """Runs the eight-head model under `single` and under each (layout, sizes) of `meshes` on 8
  devices; every logged training and eval loss equal to single's (RTOL). The meshes' summaries."""
  ref_dir = tmp_path_factory.mktemp("single")
  loop.run(eight_head_config(shared_data, data_dir, "single"), str(ref_dir))
  ref_train, ref_eval = losses(ref_dir)
  summaries = []
  for layout, sizes in meshes:
    workdir = tmp_path_factory.mktemp(layout)
    summaries.append(
      loop.run(eight_head_config(shared_data, data_dir, layout, **sizes), str(workdir))
    )
    assert summaries[-1]["devices"] == 8
    got_train, got_eval = losses(workdir)
    np.testing.assert_allclose(got_train, ref_train, rtol=RTOL, err_msg=f"{layout} {sizes}")
    np.testing.assert_allclose(got_eval, ref_eval, rtol=RTOL, err_msg=f"{layout} {sizes}")
  return summaries
