"""Data: tokenizers, local text and prepared TFDS datasets, and the grain batch pipeline."""

from cgpt_jax.data.batches import Corpus, eval_batches, load_corpus, train_batches
from cgpt_jax.data.text_builder import prepare_text_dataset
from cgpt_jax.data.tokenizers import Tokenizer, make_tokenizer, tokenizer_identity

__all__ = [
  "Corpus",
  "Tokenizer",
  "eval_batches",
  "load_corpus",
  "make_tokenizer",
  "prepare_text_dataset",
  "tokenizer_identity",
  "train_batches",
]
