"""Cerebras-GPT at one of the paper's sizes: `--config experiments/cerebras_gpt.py:111m`, or its muP
variant (111M to 2.7B): `:111m-mup` (base LR 6e-3, init 0.08, muP multipliers; mup.py).

The paper's recipe (arXiv 2304.03208, REFERENCE.md §1): GPT-2 BPE, 2048-token sequences, the size's
batch and peak LR, AdamW beta=(0.9, 0.95), weight decay 0.1, clip 1.0, linear warm-up over 375M
tokens then linear or cosine decay to 10% at the Chinchilla budget of 20 tokens per parameter.
The data here is the Gutenberg selection in ../shared/data (the Pile is not available offline).
On this CPU use --plan, or override train.steps / data.global_batch for a short run.
"""
import math

from cgpt_jax import config as config_lib
from cgpt_jax.errors import InputError


def get_config(arg="111m"):
  size = (arg or "111m").lower()
  sizes = {**config_lib.CEREBRAS_GPT, **config_lib.CEREBRAS_GPT_MUP}
  if size not in sizes:
    raise InputError(f"experiments/cerebras_gpt.py:{arg}: unknown size. "
                     f"Choose one of: {', '.join(sizes)}.")
  p = sizes[size]
  c = config_lib.base_config()
  c.model.preset = size
  c.data.source = "../shared/data/gutenberg"
  c.data.tokenizer = "gpt2"
  c.data.seq_len = 2048
  c.data.global_batch = p.batch
  c.data.eval_batches = 20
  c.optim.lr = p.lr
  c.optim.eps = p.eps
  c.optim.schedule = p.decay
  tokens_per_step = p.batch * 2048
  c.optim.warmup_steps = math.ceil(config_lib.WARMUP_TOKENS / tokens_per_step)
  params = config_lib.closed_form_params(p.n_layers, p.d_model)
  c.train.steps = math.ceil(config_lib.TOKENS_PER_PARAM * params / tokens_per_step)
  c.train.eval_every = 1000
  return c
