"""A trained workdir: sliding-window evaluation scores every token once with the context the recipe
promises; generation, export to GPT-2 format and fine-tuning from it work from the checkpoint."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import SHAKESPEARE, assert_bad_input, launch, tiny_config

from cgpt_jax import data, perplexity, run_modes
from cgpt_jax.errors import InputError
from cgpt_jax.train import loop, setup, step_functions


@pytest.mark.parametrize(
  "n,window,stride", [(2, 8, 4), (10, 8, 8), (37, 8, 3), (37, 8, 1), (64, 8, 8)]
)
def test_windows_score_every_position_once(n, window, stride):
  scored = [p for _, end, first in perplexity.windows(n, window, stride) for p in range(first, end)]
  assert scored == list(range(1, n))
  for begin, end, first in perplexity.windows(n, window, stride):
    assert end - begin <= window + 1 and begin % stride == 0 and begin < first


@pytest.fixture(scope="module")
def trained(shared_data, data_dir, tmp_path_factory):
  """20 steps of the tiny model with a checkpoint at the end."""
  workdir = tmp_path_factory.mktemp("trained")
  c = tiny_config(shared_data, data_dir, layout="single")
  c.train.steps, c.train.eval_every, c.checkpoint.every = 20, 20, 20
  loop.run(c, str(workdir))
  return c, workdir


# Slow: 23 s of strided evaluations; eval on a trained run stays in the default run.
@pytest.mark.slow
def test_sliding_window_loss_is_the_per_token_recipe(trained):
  """Each position p is predicted from the window that scores it, the first (a multiple of the
  stride) whose `window` inputs reach p - 1: recomputed here one position at a time."""
  c, workdir = trained
  s, params, tokenizer, step = run_modes.load_trained(c, str(workdir))
  assert step == 20
  tokens = tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.")
  window, stride = 16, 5
  got = perplexity.sliding_window_loss(
    params, step_functions.make_loss(s, per_token=True), tokens, window, stride, batch=4
  )
  model = nnx.merge(s.graphdef, params)
  nll = []
  for p in range(1, len(tokens)):
    begin = max(0, math.ceil((p - window) / stride) * stride)
    logits = model(tokens[None, begin:p])[0, -1, : c.model.vocab_size]
    nll.append(-float(jax.nn.log_softmax(logits)[tokens[p]]))
  assert got["tokens_scored"] == len(tokens) - 1
  np.testing.assert_allclose(got["loss"], np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], math.exp(np.mean(nll)), rtol=1e-5)


def test_eval_generate_export_and_fine_tune(trained, shared_data, tmp_path):
  c, workdir = trained
  c = c.copy_and_resolve_references()
  result = run_modes.evaluate(c, str(workdir))
  assert result["tokens_scored"] == result["tokens"] - 1 and result["loss"] < math.log(65)
  assert (
    json.loads((workdir / "evals.jsonl").read_text().splitlines()[-1])["loss"] == result["loss"]
  )

  c.generate.update(prompt="ROMEO:", max_new_tokens=12, method="greedy")
  sample = run_modes.generate(c, str(workdir))
  assert sample["tokens"] == 12 and len(sample["completion"]) == 12  # one character per token

  c.export.hf_dir = str(tmp_path / "hf")
  run_modes.export_hf(c, str(workdir))
  with pytest.raises(InputError, match="already"):  # never over an existing export
    run_modes.export_hf(c, str(workdir))

  # Fine-tuning from the export: the first step's loss is the trained model's on batch 0.
  s, params, _, _ = run_modes.load_trained(c, str(workdir))
  batch = np.asarray(
    next(
      iter(
        data.train_batches(
          setup.load_data(s.cfg).tokens["train"], seq_len=64, global_batch=16, seed=0
        )
      )
    )
  )
  expected = float(step_functions.make_loss(s)(params, batch))
  tuned = c.copy_and_resolve_references()
  tuned.init.from_hf = str(tmp_path / "hf")
  tuned.train.steps, tuned.optim.warmup_steps = 1, 0
  loop.run(tuned, str(tmp_path / "tuned"))
  first = json.loads((tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()[0])
  np.testing.assert_allclose(first["loss"], expected, rtol=1e-6)


def test_eval_without_a_checkpoint_is_a_clear_error(shared_data, tmp_path):
  r = launch(
    SHAKESPEARE,
    f"--config.data.source={shared_data / 'tinyshakespeare' / 'input.txt'}",
    "--mode=eval",
    f"--workdir={tmp_path}",
  )
  assert_bad_input(r, "has no checkpoint", "Train there first")
