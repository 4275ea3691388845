"""What to do with a trained workdir: evaluate it on a text, generate from a prompt, export it to
Hugging Face's GPT-2 format. Each restores the latest checkpoint into the run's layout (any layout,
as training resumes do) and appends its result to a JSONL file in the workdir (never overwriting).
"""

import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from cgpt_jax import checkpoint, data, hf, perplexity
from cgpt_jax import generate as generate_lib
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import pipeline
from cgpt_jax.train import setup, step_functions


def load_trained(cfg: ml_collections.ConfigDict, workdir: str):
  """(Setup, parameters in the run's layout, tokenizer, step) from WORKDIR's latest checkpoint."""
  out = pathlib.Path(workdir)
  tokenizer = setup.load_tokenizer(cfg)
  s = setup.build(cfg, tokenizer.vocab_size)
  step = None
  if (out / "checkpoints").is_dir():
    ckpt = checkpoint.Checkpointer(
      out / "checkpoints", s.cfg, data.tokenizer_identity(tokenizer), read_only=True
    )
    step = ckpt.latest_step()
  if step is None:
    raise InputError(
      f"--workdir {out} has no checkpoint (looked in {out / 'checkpoints'}). Train "
      "there first, or point --workdir at a trained run."
    )
  state = setup.restore(s, ckpt, step, resume=False)
  ckpt.close()
  check_finite(state.params, out / "checkpoints" / str(step))
  return s, state.params, tokenizer, step


def check_finite(params, where: pathlib.Path) -> None:
  """Refuses parameters holding nan or inf (a diverged run's, saved before runs checked)."""
  bad = [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_leaves_with_path(params)
    if not bool(jax.numpy.isfinite(x).all())
  ]
  if bad:
    raise InputError(
      f"checkpoint {where} holds non-finite parameters (nan or inf, e.g. in "
      f"{bad[0]}): it is from a diverged run. Delete that step directory to use an "
      "earlier one, or retrain with a lower --config.optim.lr."
    )


def _append(out: pathlib.Path, name: str, record: dict) -> None:
  with open(out / name, "a") as f:
    f.write(json.dumps(record) + "\n")


def evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Sliding-window loss and perplexity of the latest checkpoint on evaluate.text (a file), or on
  the validation split of the training data when that is empty -> WORKDIR/evals.jsonl."""
  s, params, tokenizer, step = load_trained(cfg, workdir)
  e, d = s.cfg.evaluate, s.cfg.data
  if e.text:
    path = pathlib.Path(e.text)
    try:
      text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
      raise InputError(
        f"config evaluate.text={e.text!r}: cannot read it ({err}). Give a UTF-8 text file."
      ) from None
    tokens, source = tokenizer.encode(text), str(path)
  else:
    tokens, source = setup.load_data(s.cfg).tokens["validation"], f"{d.source} (validation split)"
  stride = e.stride or max(d.seq_len // 2, 1)
  t0 = time.perf_counter()
  result = perplexity.sliding_window_loss(
    params, step_functions.make_loss(s, per_token=True), tokens, d.seq_len, stride, d.eval_batch
  )
  result.update(step=step, text=source, tokenizer=tokenizer.name, seconds=time.perf_counter() - t0)
  _append(pathlib.Path(workdir), "evals.jsonl", result)
  return result


def generate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """A continuation of generate.prompt from the latest checkpoint -> WORKDIR/samples.jsonl."""
  s, params, tokenizer, step = load_trained(cfg, workdir)
  g = s.cfg.generate
  if not g.prompt:
    raise InputError(
      "config generate.prompt is empty. Give the text to continue, e.g. "
      "--config.generate.prompt='ROMEO:'."
    )
  prompt = tokenizer.encode(g.prompt)
  t0 = time.perf_counter()
  new = generate_lib.generate(
    s.graphdef,
    pipeline.from_stages(params, s.schedule),
    s.cfg.model,
    prompt,
    g.max_new_tokens,
    method=g.method,
    temperature=g.temperature,
    top_k=g.top_k,
    top_p=g.top_p,
    num_beams=g.num_beams,
    length_penalty=g.length_penalty,
    no_repeat_ngram_size=g.no_repeat_ngram_size,
    eos_id=tokenizer.eot_id,
    seed=g.seed,
    layout=None if s.schedule else s.layout,
  )
  result = {
    "step": step,
    "prompt": g.prompt,
    "completion": tokenizer.decode(np.asarray(new)),
    "tokens": int(len(new)),
    "seconds": time.perf_counter() - t0,
    **g.to_dict(),
  }
  _append(pathlib.Path(workdir), "samples.jsonl", result)
  return result


def export_hf(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """The latest checkpoint as a GPT-2-format folder (config.json + model.safetensors)."""
  s, params, tokenizer, _ = load_trained(cfg, workdir)
  folder = s.cfg.export.hf_dir or str(pathlib.Path(workdir) / "hf")
  hf.export(
    jax.device_get(pipeline.from_stages(params, s.schedule)),
    s.cfg.model,
    folder,
    data.tokenizer_identity(tokenizer),
  )
  return folder
