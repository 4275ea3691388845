"""launch.py as a user runs it: bad input exits 2 with a clear message before compiling; plans
work."""

import json

import pytest
from helpers import SHAKESPEARE, assert_bad_input, launch


def test_missing_data(tmp_path):
  r = launch(
    SHAKESPEARE,
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.source={tmp_path / 'nope.txt'}",
    f"--config.data.data_dir={tmp_path}",
  )
  assert_bad_input(r, str(tmp_path / "nope.txt"))
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_data(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  r = launch(
    SHAKESPEARE,
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.source={tmp_path / 'empty.txt'}",
    f"--config.data.data_dir={tmp_path}",
  )
  assert_bad_input(r, "empty")


def test_unknown_preset(tmp_path, data_flags):
  assert_bad_input(
    launch("--config=experiments/cerebras_gpt.py:999m", f"--workdir={tmp_path}"), "999m", "111m"
  )
  assert_bad_input(
    launch(SHAKESPEARE, *data_flags, "--config.model.preset=huge", f"--workdir={tmp_path}"),
    "huge",
    "111m",
  )


def test_seq_len_above_positions(tmp_path, data_flags):
  assert_bad_input(
    launch(SHAKESPEARE, *data_flags, "--config.data.seq_len=65", f"--workdir={tmp_path}"),
    "seq_len=65",
    "n_positions",
  )


def test_batch_not_divisible_by_batch_axes(tmp_path, data_flags):
  r = launch(
    SHAKESPEARE, *data_flags, "--config.mesh.layout=dp", f"--workdir={tmp_path}", devices=8
  )
  assert_bad_input(r, "global_batch=12", "8")


def test_mesh_that_does_not_fit_the_devices(tmp_path, data_flags):
  r = launch(
    SHAKESPEARE,
    *data_flags,
    "--config.mesh.layout=dp",
    "--config.mesh.data=3",
    "--config.data.global_batch=12",
    f"--workdir={tmp_path}",
    devices=8,
  )
  assert_bad_input(r, "data=3", "8")


@pytest.mark.parametrize(
  "flags,phrases",
  [
    (
      ["--config.mesh.layout=tp", "--config.model.n_heads=4", "--config.model.preset=char4"],
      ["'heads' dimension", "8 devices"],
    ),  # 4 heads over 8 tensor devices
    (
      ["--config.mesh.layout=tp", "--config.mesh.data=-1", "--config.mesh.tensor=-1"],
      ["at most one"],
    ),
    (["--config.mesh.layout=dp", "--config.mesh.data=0"], ["mesh.data=0", "positive"]),
    (
      ["--config.mesh.layout=pp", "--config.mesh.pipe=8", "--config.data.global_batch=16"],
      ["n_layers=4", "pipe stages x repeats", "8"],
    ),
    (
      ["--config.mesh.layout=single", "--config.mesh.data=2"],
      ["needs 2 devices", "1 are available"],
    ),
    (
      ["--config.mesh.layout=fsdp", "--config.model.d_model=132", "--config.data.global_batch=16"],
      ["'embed' dimension", "132"],
    ),
  ],
)
def test_bad_layouts(tmp_path, data_flags, flags, phrases):
  assert_bad_input(
    launch(SHAKESPEARE, *data_flags, *flags, f"--workdir={tmp_path}", devices=8), *phrases
  )


def test_unknown_override_and_layout(tmp_path, data_flags):
  assert_bad_input(
    launch(SHAKESPEARE, "--config.model.colour=red", f"--workdir={tmp_path}"), "colour"
  )
  assert_bad_input(
    launch(SHAKESPEARE, *data_flags, "--config.mesh.layout=wafer9", f"--workdir={tmp_path}"),
    "wafer9",
    "single",
  )


def test_unwritable_workdir(tmp_path, data_flags):
  (tmp_path / "a_file").write_text("x")
  assert_bad_input(
    launch(SHAKESPEARE, *data_flags, f"--workdir={tmp_path / 'a_file' / 'run'}"), "not writable"
  )


def test_existing_run_is_not_overwritten(tmp_path, data_flags):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 4.2}\n')
  assert_bad_input(launch(SHAKESPEARE, *data_flags, f"--workdir={tmp_path}"), "already holds a run")
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 4.2}\n'


def test_plan_13b_from_abstract_shapes(tmp_path, shared_data):
  """The 13B preset plans on this 24 GiB machine: nothing is allocated (RSS stays small)."""
  r = launch(
    "--config=experiments/cerebras_gpt.py:13b",
    "--plan",
    f"--workdir={tmp_path}",
    f"--config.data.tokenizer_path={shared_data / 'gpt2'}",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan["params"] == 12_853_386_240
  assert plan["chinchilla_tokens"] == 20 * 12_853_386_240
  # Bytes held include the embedding table's padding to 50304 rows (a multiple of 128).
  assert plan["param_bytes"] == 4 * (12_853_386_240 + (50304 - 50257) * 5120)
  assert plan["optimizer_state_bytes"] >= 8 * 12_853_386_240  # Adam's two float32 moments
  # 6 N per token for the matmul parameters plus 12 L T d for attention (docs/formulas.md#flops).
  n_matmul = 40 * 12 * 5120**2 + 50257 * 5120
  assert plan["flops_per_token"] == 6 * n_matmul + 12 * 40 * 2048 * 5120
  assert plan["fits_80GB"] is False  # 154 GB of fp32 parameters and Adam moments on one device


def test_plan_13b_on_64_devices(tmp_path, shared_data):
  """fsdp 8 x tensor 8: state is split 64 ways, so per-device arguments are 1/64 of one device's."""
  r = launch(
    "--config=experiments/cerebras_gpt.py:13b",
    "--plan",
    f"--workdir={tmp_path}",
    "--config.mesh.layout=fsdp",
    "--config.mesh.fsdp=8",
    "--config.mesh.tensor=8",
    "--config.data.global_batch=64",
    "--config.model.remat=full",
    f"--config.data.tokenizer_path={shared_data / 'gpt2'}",
    devices=64,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan["devices"] == 64 and plan["mesh"]["fsdp"] == 8 and plan["mesh"]["tensor"] == 8
  state_bytes = plan["param_bytes"] + plan["optimizer_state_bytes"]
  arguments = plan["memory_per_device_bytes"]["argument_bytes"]
  assert state_bytes / 64 <= arguments <= state_bytes / 64 * 1.01 + 2**20
  assert plan["analytic_collective_bytes_per_step"] > 0 and plan["collective_bytes_per_step"]


def test_plan_13b_with_a_pipeline_on_64_devices(tmp_path, shared_data):
  """pipe 4 x fsdp 4 x tensor 4: 10 layers per stage, 8 microbatches. The compiled FLOPs are the
  formula's exactly: bubbles included, (M + S - 1) / M = 11/8 on the blocks."""
  r = launch(
    "--config=experiments/cerebras_gpt.py:13b",
    "--plan",
    f"--workdir={tmp_path}",
    "--config.mesh.layout=pp",
    "--config.mesh.pipe=4",
    "--config.mesh.fsdp=4",
    "--config.mesh.tensor=4",
    "--config.pipeline.microbatches=8",
    "--config.data.global_batch=64",
    "--config.model.remat=full",
    f"--config.data.tokenizer_path={shared_data / 'gpt2'}",
    devices=64,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan["mesh"] == {"data": 1, "pipe": 4, "fsdp": 4, "context": 1, "tensor": 4}
  p = plan["pipeline"]
  assert (p["stages"], p["microbatches"], p["iterations"]) == (4, 8, 11)
  assert p["bubble_fraction_theory"] == 3 / 11
  assert plan["compiled_matmul_flops_per_step"] == plan["expected_matmul_flops_per_step"]
  assert plan["fits_80GB"] is True


def test_bad_recipe_settings(tmp_path, data_flags):
  """Optimizer, dtype and Adafactor options are checked before anything compiles."""
  for flags, phrases in [
    (["--config.optim.name=sgd"], ["optim.name='sgd'", "adafactor"]),
    (["--config.model.dtype=float16"], ["model.dtype='float16'", "bfloat16"]),
    (
      ["--config.optim.name=adafactor", "--config.optim.adafactor.clip_threshold=0.5"],
      ["clip_threshold=0.5", ">= 1"],
    ),
    (["--config.optim.adafactor.relative_step=True"], ["relative_step", "optim.name=adafactor"]),
  ]:
    assert_bad_input(launch(SHAKESPEARE, *data_flags, *flags, f"--workdir={tmp_path}"), *phrases)
  assert not any(tmp_path.iterdir())  # nothing written
