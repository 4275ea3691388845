"""Tokenizers against outside facts: OpenAI's GPT-2 ids (shared/data/README.md), nanoGPT's char
vocabulary."""

import numpy as np
import pytest

from cgpt_jax.data import Tokenizer, make_tokenizer
from cgpt_jax.errors import InputError


@pytest.fixture(scope="module")
def gpt2(shared_data):
  return make_tokenizer("gpt2", path=str(shared_data / "gpt2"))


@pytest.fixture(scope="module")
def shakespeare(shakespeare_file) -> str:
  return shakespeare_file.read_text(encoding="utf-8")


def test_gpt2_known_ids(gpt2, shakespeare):
  assert isinstance(gpt2, Tokenizer)
  assert (gpt2.name, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
  hello = gpt2.encode("Hello world")
  assert hello.dtype == np.int32
  assert hello.tolist() == [15496, 995]
  # The first ids depend only on the first few lines, so a prefix is enough.
  first_ids = [5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252, 11]
  assert gpt2.encode(shakespeare[:1000])[:10].tolist() == first_ids
  assert gpt2.decode(gpt2.encode(shakespeare[:1000])) == shakespeare[:1000]


def test_gpt2_endoftext_is_only_a_separator(gpt2):
  # Like tiktoken's encode_ordinary: a literal "<|endoftext|>" in the text stays text; only the
  # pipeline inserts id 50256 between documents.
  literal = gpt2.encode("<|endoftext|>")
  assert 50256 not in literal.tolist() and len(literal) > 1
  assert gpt2.decode(literal) == "<|endoftext|>"
  assert gpt2.decode([50256]) == "<|endoftext|>"


def test_char_vocabulary_of_tiny_shakespeare(shakespeare):
  tok = make_tokenizer("char", corpus_text=shakespeare)
  assert (tok.name, tok.vocab_size, tok.eot_id) == ("char", 65, None)
  ids = tok.encode(shakespeare)
  assert ids.dtype == np.int32 and len(ids) == len(shakespeare)
  # Ids are ranks in the sorted character set, as in nanoGPT's shakespeare_char/prepare.py.
  stoi = {ch: i for i, ch in enumerate(sorted(set(shakespeare)))}
  assert ids[:200].tolist() == [stoi[ch] for ch in shakespeare[:200]]
  assert tok.decode(ids) == shakespeare


def test_char_rejects_characters_outside_the_vocabulary():
  tok = make_tokenizer("char", corpus_text="abc")
  with pytest.raises(InputError, match="'z'"):
    tok.encode("abz")


def test_bytes_round_trip_non_ascii():
  tok = make_tokenizer("bytes")
  text = "naïve café — 東京\n"
  ids = tok.encode(text)
  assert (tok.vocab_size, tok.eot_id) == (256, None)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(ids[:-2]).endswith("\ufffd")  # A cut multi-byte character does not raise.


def test_unknown_kind_lists_valid_kinds():
  with pytest.raises(InputError, match="char, bytes, gpt2"):
    make_tokenizer("sentencepiece")


def test_gpt2_missing_folder_or_file(tmp_path, shared_data):
  with pytest.raises(InputError, match="does not exist"):
    make_tokenizer("gpt2", path=str(tmp_path / "nowhere"))
  with pytest.raises(InputError, match="needs a folder"):
    make_tokenizer("gpt2")
  (tmp_path / "encoder.json").symlink_to(shared_data / "gpt2" / "encoder.json")
  with pytest.raises(InputError, match="vocab.bpe is missing"):
    make_tokenizer("gpt2", path=str(tmp_path))


def test_char_needs_corpus_text():
  with pytest.raises(InputError, match="corpus_text"):
    make_tokenizer("char")
