"""Eight virtual CPU devices for every test, set before jax is imported anywhere."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.fail(f"../shared/data not found beside the repository (looked in {SHARED_DATA})")
  return SHARED_DATA


@pytest.fixture(scope="module")
def data_flags(shared_data, tmp_path_factory) -> list[str]:
  """launch.py flags for tiny Shakespeare, prepared into a data dir of the test module's own."""
  return [f"--config.data.source={shared_data / 'tinyshakespeare' / 'input.txt'}",
          f"--config.data.data_dir={tmp_path_factory.mktemp('tfds')}"]


import sys  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))  # experiment files are importable by name in tests
