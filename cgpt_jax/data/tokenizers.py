"""Text <-> token ids: a character vocabulary, raw UTF-8 bytes, or GPT-2's byte-level BPE.

All three answer the same small `Tokenizer` protocol so that the corpus loader and the sampler never
branch on the kind. `encode` returns int32 numpy arrays because that is what the batch pipeline
packs and what the model consumes; `eot_id` is the id put between documents (None for tokenizers
without one, whose documents are then simply concatenated, as nanoGPT does for its char-level runs).
"""

import hashlib
import pathlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers

from cgpt_jax.config import TOKENIZERS
from cgpt_jax.errors import InputError

GPT2_FILES = ("encoder.json", "vocab.bpe")
GPT2_EOT = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline and the sampler need from a tokenizer."""

  name: str
  vocab_size: int
  eot_id: int | None
  vocabulary: bytes  # what defines the ids: two tokenizers with the same are the same function

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`, int32, shape [n]."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; never raises on ids that cut a multi-byte character (sampled text does)."""
    ...


class CharTokenizer:
  """One id per distinct character of the corpus, ids in sorted character order (nanoGPT's
  shakespeare_char/prepare.py), so the same corpus always gives the same vocabulary."""

  name = "char"
  eot_id = None

  def __init__(self, corpus_text: str):
    if not corpus_text:
      raise InputError(
        "char tokenizer: the corpus text is empty, so there is no vocabulary to build; "
        "point the data source at non-empty text files"
      )
    self.chars = "".join(sorted(set(corpus_text)))
    self.vocab_size = len(self.chars)
    self.vocabulary = self.chars.encode("utf-8")
    # Sorted code points let encode() map a whole text with one searchsorted instead of a Python
    # dict lookup per character (tiny shakespeare is a million characters).
    self._codes = _code_points(self.chars)

  def encode(self, text: str) -> np.ndarray:
    codes = _code_points(text)
    ids = np.minimum(np.searchsorted(self._codes, codes), self.vocab_size - 1)
    unknown = self._codes[ids] != codes
    if unknown.any():
      missing = "".join(sorted({chr(c) for c in codes[unknown]}))
      raise InputError(
        f"char tokenizer: characters {missing!r} are not in the corpus vocabulary "
        f"({self.vocab_size} characters); use only characters that occur in the corpus "
        "or switch to the 'bytes' or 'gpt2' tokenizer"
      )
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1))


class ByteTokenizer:
  """The UTF-8 bytes of the text: a fixed 256-entry vocabulary that needs no files and no corpus."""

  name = "bytes"
  vocab_size = 256
  eot_id = None
  vocabulary = bytes(range(256))

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    # A sampled sequence can end (or wander) inside a multi-byte character.
    return bytes(np.asarray(ids, dtype=np.uint8).reshape(-1)).decode("utf-8", errors="replace")


class Gpt2Tokenizer:
  """GPT-2's byte-level BPE loaded from OpenAI's own encoder.json + vocab.bpe.

  `<|endoftext|>` is deliberately NOT registered as a special token: it is only ever inserted by the
  pipeline as `eot_id`, and a literal "<|endoftext|>" inside the text is encoded as ordinary text.
  That is tiktoken's `encode_ordinary`, which nanoGPT uses for its data, so corpus text can never
  forge a document boundary.
  """

  name = "gpt2"

  def __init__(self, folder: str | None):
    if folder is None:
      raise InputError(
        "the gpt2 tokenizer needs a folder holding encoder.json and vocab.bpe; "
        "set the tokenizer path (e.g. shared/data/gpt2)"
      )
    root = pathlib.Path(folder)
    if not root.is_dir():
      raise InputError(
        f"gpt2 tokenizer folder {root} does not exist or is not a folder; point the "
        "tokenizer path at the folder holding encoder.json and vocab.bpe"
      )
    for file_name in GPT2_FILES:
      if not (root / file_name).is_file():
        raise InputError(
          f"gpt2 tokenizer: {root / file_name} is missing; the folder must hold both "
          f"{' and '.join(GPT2_FILES)} as OpenAI ships them"
        )
    vocab, merges = (str(root / file_name) for file_name in GPT2_FILES)
    self.vocabulary = b"\0".join((root / file_name).read_bytes() for file_name in GPT2_FILES)
    try:
      self._bpe = tokenizers.ByteLevelBPETokenizer(vocab, merges)
    except Exception as e:  # tokenizers raises a bare Exception for unreadable or malformed files.
      raise InputError(
        f"gpt2 tokenizer: could not load {vocab} and {merges} ({e}); they must be "
        "GPT-2's encoder.json (token -> id JSON) and vocab.bpe (BPE merges)"
      ) from e
    self.vocab_size = self._bpe.get_vocab_size()
    self.eot_id = self._bpe.token_to_id(GPT2_EOT)
    if self.eot_id is None:
      raise InputError(
        f"gpt2 tokenizer: {vocab} has no {GPT2_EOT} token, so it is not a GPT-2 "
        "vocabulary; use OpenAI's encoder.json"
      )

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._bpe.encode(text).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._bpe.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist())


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
  """What checkpoints and exported models record of their tokenizer, and compare on reuse."""
  return {
    "kind": tokenizer.name,
    "vocab_size": int(tokenizer.vocab_size),
    "sha256": hashlib.sha256(tokenizer.vocabulary).hexdigest()[:16],
  }


def make_tokenizer(
  kind: str, *, path: str | None = None, corpus_text: str | None = None
) -> Tokenizer:
  """The tokenizer `kind`: 'char' needs `corpus_text`, 'gpt2' needs the folder `path`."""
  if kind == "char":
    if corpus_text is None:
      raise InputError("the char tokenizer builds its vocabulary from the corpus; pass corpus_text")
    return CharTokenizer(corpus_text)
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "gpt2":
    return Gpt2Tokenizer(path)
  raise InputError(f"unknown tokenizer {kind!r}; valid tokenizers are {', '.join(TOKENIZERS)}")


def _code_points(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
