"""Cerebras-GPT at one of the paper's sizes: `--config experiments/cerebras_gpt.py:111m`, or its muP
variant (111M to 2.7B): `:111m-mup` (base LR 6e-3, init 0.08, muP multipliers; mup.py).

The recipe is `config.cerebras_gpt(size)`: GPT-2 BPE, 2048-token sequences, the size's batch and
peak LR, AdamW, 375M warm-up tokens, decay to 10% at 20 tokens per parameter, on the Gutenberg
selection in ../shared/data. On this CPU use --plan, or override train.steps / data.global_batch
for a short run.
"""

from cgpt_jax import config as config_lib
from cgpt_jax.errors import InputError


def get_config(arg="111m"):
  try:
    return config_lib.cerebras_gpt((arg or "111m").lower())
  except InputError as e:
    raise InputError(f"experiments/cerebras_gpt.py:{arg}: {e}") from None
