"""The Cerebras-GPT family as data (arXiv 2304.03208, docs/cerebras_gpt.md): each size's shape and
recipe, small shapes for laptops and tests, and the closed-form parameter counts. config.py builds
configs from these; nothing here imports the config."""

import dataclasses

from cgpt_jax import mup

GPT2_VOCAB = 50257  # the GPT-2 BPE tokenizer's size (before padding: model.padded_vocab)
TOKENS_PER_PARAM = 20  # Chinchilla-optimal budget used by Cerebras-GPT
WARMUP_TOKENS = 375e6  # Cerebras-GPT's linear warm-up length in tokens


# Cerebras-GPT (arXiv 2304.03208, model zoo configs): layers, d_model, heads, peak LR, batch of
# 2048-token sequences, Adam eps, decay shape. d_ffn = 4 d_model, vocab 50257, 2048 positions.
@dataclasses.dataclass(frozen=True)
class Preset:
  n_layers: int
  d_model: int
  n_heads: int
  lr: float = 6e-4
  batch: int = 120
  eps: float = 1e-8
  decay: str = "linear"
  mup: bool = False


CEREBRAS_GPT = {
  "111m": Preset(10, 768, 12, 6e-4, 120, 1e-8, "linear"),
  "256m": Preset(14, 1088, 17, 6e-4, 264, 1e-8, "linear"),
  "590m": Preset(18, 1536, 12, 2e-4, 264, 1e-8, "linear"),
  "1.3b": Preset(24, 2048, 16, 2e-4, 528, 1e-8, "cosine"),
  "2.7b": Preset(32, 2560, 32, 2e-4, 528, 1e-8, "cosine"),
  "6.7b": Preset(32, 4096, 32, 1.2e-4, 1040, 1e-9, "linear"),
  "13b": Preset(40, 5120, 40, 1.2e-4, 720, 1e-9, "cosine"),
}
# Cerebras-GPT-muP: the same shapes and batches with muP's base LR (mup.py, docs/mup.md).
CEREBRAS_GPT_MUP = {
  f"{size}-mup": dataclasses.replace(CEREBRAS_GPT[size], lr=mup.BASE_LR, mup=True)
  for size in ("111m", "256m", "590m", "1.3b", "2.7b")
}
# Small shapes for laptops and tests; not part of the paper.
SMALL = {
  "tiny": Preset(2, 64, 2),  # tests: compiles in seconds
  "char4": Preset(4, 128, 4),  # nanoGPT's CPU shakespeare_char shape
  "char6": Preset(6, 384, 6),  # nanoGPT's GPU shakespeare_char shape
}
PRESETS = {**CEREBRAS_GPT, **CEREBRAS_GPT_MUP, **SMALL}


def layer_matrix_params(d_model: int, d_ff: int) -> int:
  """Parameters of one block's matrices: QKV and attention-out (4 d^2), MLP in and out (2 d f)."""
  return 4 * d_model**2 + 2 * d_model * d_ff


def layer_params(d_model: int, d_ff: int) -> int:
  """Parameters of one block: its matrices, their biases (QKV 3 d, attention-out d, MLP-in f,
  MLP-out d) and two layer norms (4 d). With d_ff = 4 d: 12 d^2 + 13 d
  (docs/cerebras_gpt.md#parameter-count)."""
  return layer_matrix_params(d_model, d_ff) + 9 * d_model + d_ff


def closed_form_params(
  n_layers: int,
  d_model: int,
  vocab: int = GPT2_VOCAB,
  positions: int = 2048,
  d_ff: int | None = None,
) -> int:
  """V d + P d + L (12 d^2 + 13 d) + 2 d, for d_ff = 4 d (the default) and tied embeddings
  (docs/cerebras_gpt.md#parameter-count); the blocks' term is layer_params for another d_ff.

  Lets a config derive its Chinchilla budget without building the model; the model's own count,
  from abstract shapes, is what reports use and what the tests hold to the paper's table.
  """
  blocks = n_layers * layer_params(d_model, d_ff or 4 * d_model)
  return (vocab + positions) * d_model + blocks + 2 * d_model
