"""Eight virtual CPU devices for every test, set before jax is imported anywhere, the two settings
that keep the suite's compile time down, and the fixtures several modules share (their plain
functions and constants are in helpers.py)."""

import atexit
import functools
import os
import pathlib
import shutil
import tempfile

# LLVM at -O0 for the compiled kernels: the tests compile hundreds of small programs and run each
# for a few steps, so code generation is a large share of their time (-O0 took a tenth off the
# suite). The HLO passes, and so every collective, FLOP and memory figure the tests assert, are the
# same at any level.
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
# One compilation cache for the session, shared with the launch.py processes tests start (they
# inherit the environment): the same tiny programs are compiled by many tests. Keyed on the
# program and the flags, so a hit is the program that would have been compiled.
# pytest-xdist's workers inherit the directory from the process that started them.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cgpt-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from helpers import SHARED_DATA, compiled_step, eight_head_config  # noqa: E402  (after the device count)

from cgpt_jax.train import setup  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.fail(f"../shared/data not found beside the repository (looked in {SHARED_DATA})")
  return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare_file(shared_data) -> pathlib.Path:
  """Tiny Shakespeare, the default experiment's text."""
  return shared_data / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir of the test module's own: its prepared datasets are shared by its tests."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def data_flags(shakespeare_file, tmp_path_factory) -> list[str]:
  """launch.py flags for tiny Shakespeare, prepared into a data dir of the test module's own."""
  return [
    f"--config.data.source={shakespeare_file}",
    f"--config.data.data_dir={tmp_path_factory.mktemp('tfds')}",
  ]


@pytest.fixture(scope="module")
def layout_step(shared_data, data_dir):
  """layout_step(layout, sizes, grad_accum, model) -> (Setup, compiled train step) of the eight-head
  model, compiled once per module: the bytes and the memory tests read the same programs. Batch 16,
  or 64 under gradient accumulation (pp: 4 micro-steps x 4 microbatches x data 4)."""

  @functools.cache
  def build(layout, sizes, grad_accum, model):
    c = eight_head_config(shared_data, data_dir, layout, **dict(sizes))
    c.model.update(dict(model))
    c.train.grad_accum = grad_accum
    c.data.global_batch = 64 if grad_accum > 1 else 16
    s = setup.build(c, 65)
    return s, compiled_step(s)

  return lambda layout, sizes, grad_accum=1, model=None: build(
    layout, tuple(sorted(sizes.items())), grad_accum, tuple(sorted((model or {}).items()))
  )
