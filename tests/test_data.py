"""The data package: TFDS preparation of local text, the catalogue path, corpus loading and
batching.

Expected sizes are nanoGPT's published numbers for tiny shakespeare (see shared/data/README.md);
everything else is checked against values the tests compute independently of the code under test.
"""

import logging

import numpy as np
import pytest
import tokenizers

from cgpt_jax.data import (
  eval_batches,
  load_corpus,
  prepare_text_dataset,
  text_builder,
  train_batches,
)
from cgpt_jax.errors import InputError

GPT2_EOT = 50256


@pytest.fixture(scope="module")
def shakespeare_gpt2(shared_data, shakespeare_file, data_dir):
  """Tiny Shakespeare prepared into this module's data dir, as GPT-2 tokens."""
  return load_corpus(str(shakespeare_file), str(data_dir), "gpt2", str(shared_data / "gpt2"))


def _records(builder, split):
  source = builder.as_data_source()[split]
  return [{k: v.decode("utf-8") for k, v in source[i].items()} for i in range(len(source))]


def _write(folder, files):
  folder.mkdir(parents=True, exist_ok=True)
  for name, content in files.items():
    (folder / name).write_bytes(content)
  return folder


# --- split sizes (nanoGPT's numbers) --------------------------------------------------------------


def test_gpt2_split_sizes_of_tiny_shakespeare(shakespeare_gpt2):
  assert shakespeare_gpt2.tokens["train"].dtype == np.int32
  assert len(shakespeare_gpt2.tokens["train"]) == 301_966
  assert len(shakespeare_gpt2.tokens["validation"]) == 36_059
  assert GPT2_EOT not in shakespeare_gpt2.tokens["train"]  # One document: no separator.


def test_char_split_sizes_of_tiny_shakespeare(shakespeare_file, data_dir, shakespeare_gpt2):
  del shakespeare_gpt2  # Only to have the dataset prepared already.
  corpus = load_corpus(str(shakespeare_file), str(data_dir), "char")
  assert corpus.tokenizer.vocab_size == 65
  assert len(corpus.tokens["train"]) == 1_003_854
  assert len(corpus.tokens["validation"]) == 111_540
  text = open(shakespeare_file, encoding="utf-8").read()
  assert (
    corpus.tokenizer.decode(corpus.tokens["validation"][:500]) == text[1_003_854 : 1_003_854 + 500]
  )


def test_unchanged_source_is_prepared_once(
  shakespeare_file, data_dir, shakespeare_gpt2, monkeypatch
):
  del shakespeare_gpt2

  def fail(*args, **kwargs):
    raise AssertionError("prepared a second time")

  monkeypatch.setattr(text_builder.LocalText, "download_and_prepare", fail)
  builder = prepare_text_dataset(str(shakespeare_file), str(data_dir))
  assert builder.is_prepared()


def test_edited_file_gets_a_new_config(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("first version of the text\n")
  first = prepare_text_dataset(str(path), str(tmp_path / "tfds")).builder_config.name
  path.write_text("second version of the text\n")
  second = prepare_text_dataset(str(path), str(tmp_path / "tfds")).builder_config.name
  assert first != second


# --- sources: folder, glob, encodings -------------------------------------------------------------


def test_folder_source_skips_readme_and_joins_documents_with_eot(tmp_path, shared_data):
  texts = {
    "b.txt": "Second document, rather short.\n" * 5,
    "a.txt": "The first document.\n" * 7,
    "c.txt": "Third and last one.\n" * 4,
  }
  folder = _write(
    tmp_path / "corpus",
    {
      **{k: v.encode() for k, v in texts.items()},
      "README": b"licence text, not corpus\n",
      ".hidden": b"junk\n",
    },
  )
  corpus = load_corpus(str(folder), str(tmp_path / "tfds"), "gpt2", str(shared_data / "gpt2"))
  bpe = tokenizers.ByteLevelBPETokenizer(
    str(shared_data / "gpt2" / "encoder.json"), str(shared_data / "gpt2" / "vocab.bpe")
  )
  expected = {"train": [], "validation": []}
  for name in sorted(texts):
    cut = int(len(texts[name]) * 0.9)  # nanoGPT's split, per file.
    for split, piece in (("train", texts[name][:cut]), ("validation", texts[name][cut:])):
      expected[split] += ([GPT2_EOT] if expected[split] else []) + bpe.encode(piece).ids
  for split in expected:
    assert corpus.tokens[split].tolist() == expected[split], split


def test_glob_source_takes_matching_files_in_sorted_order(tmp_path):
  folder = _write(
    tmp_path / "corpus",
    {"z.txt": b"zzzz zzzz zz\n", "m.txt": b"mmmm mmmm mm\n", "notes.md": b"not matched\n"},
  )
  builder = prepare_text_dataset(str(folder / "*.txt"), str(tmp_path / "tfds"))
  sources = [r["source"] for r in _records(builder, "train")]
  assert sources == [str(folder / "m.txt"), str(folder / "z.txt")]


def test_gutenberg_folder_latin1_and_crlf(shared_data, tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger=text_builder.__name__):
    builder = prepare_text_dataset(str(shared_data / "gutenberg"), str(tmp_path / "tfds"))
  warned = " ".join(r.getMessage() for r in caplog.records if r.name == text_builder.__name__)
  assert "chesterton-ball.txt" in warned and "shakespeare-caesar.txt" in warned
  assert "austen-emma.txt" not in warned

  expected_files = sorted(p for p in (shared_data / "gutenberg").glob("*.txt"))
  for split in ("train", "validation"):
    records = _records(builder, split)
    assert [r["source"] for r in records] == [str(p) for p in expected_files]  # README skipped.
  by_name = {r["source"].rsplit("/", 1)[1]: r["text"] for r in _records(builder, "train")}
  chesterton = (shared_data / "gutenberg" / "chesterton-ball.txt").read_bytes().decode("latin-1")
  assert "é" in by_name["chesterton-ball.txt"]
  assert by_name["chesterton-ball.txt"] == chesterton[: int(len(chesterton) * 0.9)]
  moby = (shared_data / "gutenberg" / "melville-moby_dick.txt").read_bytes().decode("utf-8")
  assert "\r\n" in moby
  moby = moby.replace("\r\n", "\n")
  assert "\r" not in by_name["melville-moby_dick.txt"]
  assert by_name["melville-moby_dick.txt"] == moby[: int(len(moby) * 0.9)]


@pytest.mark.parametrize(
  "make_source, message",
  [
    (lambda tmp: tmp / "missing.txt", "does not exist"),
    (lambda tmp: tmp / "*.nothing", "matched no files"),
    (lambda tmp: _write(tmp / "corpus", {"empty.txt": b""}) / "empty.txt", "is empty"),
    (lambda tmp: _write(tmp / "corpus", {"README.md": b"only a readme\n"}), "holds no text files"),
  ],
)
def test_bad_local_sources_raise_before_writing(tmp_path, make_source, message):
  source = make_source(tmp_path)
  with pytest.raises(InputError, match=message) as error:
    prepare_text_dataset(str(source), str(tmp_path / "tfds"))
  assert str(source) in str(error.value)
  assert not (tmp_path / "tfds").exists()


# --- catalogue path -------------------------------------------------------------------------------


def test_catalogue_source_loads_a_prepared_dataset(
  shared_data, shakespeare_file, data_dir, shakespeare_gpt2
):
  config = prepare_text_dataset(str(shakespeare_file), str(data_dir)).builder_config.name
  for source in (f"tfds:local_text/{config}", f"tfds:local_text/{config}:1.0.0"):
    corpus = load_corpus(source, str(data_dir), "char")
    assert len(corpus.tokens["train"]) == 1_003_854
    assert len(corpus.tokens["validation"]) == 111_540
  via_catalogue = load_corpus(
    f"tfds:local_text/{config}", str(data_dir), "gpt2", str(shared_data / "gpt2")
  )
  assert np.array_equal(via_catalogue.tokens["validation"], shakespeare_gpt2.tokens["validation"])


@pytest.mark.parametrize(
  "source, message",
  [
    ("tfds:local_text/not-prepared", "neither in the catalogue nor prepared"),
    ("tfds:mnist", "not prepared in data_dir"),  # Registered in TFDS, never downloaded.
    ("tfds:huggingface:mnist", "not of the form"),
  ],
)
def test_catalogue_source_that_is_not_prepared(tmp_path, source, message):
  with pytest.raises(InputError, match=message):
    load_corpus(source, str(tmp_path), "bytes")


def test_catalogue_text_key_must_be_a_text_feature(shakespeare_file, data_dir, shakespeare_gpt2):
  del shakespeare_gpt2
  config = prepare_text_dataset(str(shakespeare_file), str(data_dir)).builder_config.name
  with pytest.raises(InputError, match="no text feature 'body'"):
    load_corpus(f"tfds:local_text/{config}", str(data_dir), "bytes", text_key="body")


# --- training batches -----------------------------------------------------------------------------
# A stream of distinct values (0, 1, 2, ...) makes every window's position in the stream visible.


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_rows_are_contiguous_windows_and_epochs_cover_every_window_once():
  seq_len, n = 7, 1000
  window = seq_len + 1
  windows_per_epoch = (n - seq_len) // window  # The documented count, the same at every offset.
  stream = np.arange(n, dtype=np.int32)
  batches = _take(
    train_batches(stream, seq_len=seq_len, global_batch=4, seed=3), 3 * windows_per_epoch // 4
  )
  rows = np.concatenate(batches)
  assert batches[0].shape == (4, window) and batches[0].dtype == np.int32
  assert all(np.array_equal(row, np.arange(row[0], row[0] + window)) for row in rows)
  offsets = set()
  for epoch in range(3):
    starts = rows[epoch * windows_per_epoch : (epoch + 1) * windows_per_epoch, 0]
    offset = int(starts.min())
    offsets.add(offset)
    assert 0 <= offset <= seq_len
    assert sorted(starts.tolist()) == list(
      range(offset, offset + windows_per_epoch * window, window)
    )
    assert starts.tolist() != sorted(starts.tolist())  # Shuffled.
  assert len(offsets) > 1  # With 8 possible offsets, 3 equal draws would be a 1-in-64 coincidence.


def test_same_seed_same_batches_and_resume_matches():
  stream = np.arange(5000, dtype=np.int32)
  first = _take(train_batches(stream, seq_len=15, global_batch=8, seed=1), 60)
  again = _take(train_batches(stream, seq_len=15, global_batch=8, seed=1), 60)
  other = _take(train_batches(stream, seq_len=15, global_batch=8, seed=2), 60)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  for start in (1, 37, 45):  # 45 straddles the end of the first epoch (312 windows = 39 batches).
    resumed = _take(
      train_batches(stream, seq_len=15, global_batch=8, seed=1, start_step=start), 60 - start
    )
    assert all(np.array_equal(a, b) for a, b in zip(first[start:], resumed))


def test_process_rows_concatenate_to_the_global_batch():
  stream = np.arange(3000, dtype=np.int32)
  full = _take(train_batches(stream, seq_len=9, global_batch=6, seed=5), 10)
  parts = [
    _take(
      train_batches(stream, seq_len=9, global_batch=6, seed=5, process_index=p, process_count=2), 10
    )
    for p in range(2)
  ]
  for step, batch in enumerate(full):
    assert parts[0][step].shape == (3, 10)
    assert np.array_equal(np.concatenate([parts[0][step], parts[1][step]]), batch)


def test_short_split_still_gives_one_window():
  stream = np.arange(12, dtype=np.int32)  # Fewer than seq_len + (seq_len + 1) tokens.
  rows = np.concatenate(_take(train_batches(stream, seq_len=7, global_batch=2, seed=0), 10))
  assert all(np.array_equal(row, np.arange(row[0], row[0] + 8)) and row[0] <= 4 for row in rows)


def test_train_batch_errors():
  stream = np.arange(100, dtype=np.int32)
  with pytest.raises(InputError, match="fewer than one window"):
    train_batches(stream, seq_len=100, global_batch=2, seed=0)
  with pytest.raises(InputError, match="not divisible"):
    train_batches(stream, seq_len=8, global_batch=6, seed=0, process_count=4)


# --- evaluation batches ---------------------------------------------------------------------------


def test_eval_batches_are_sequential_and_repeatable():
  stream = np.arange(1000, dtype=np.int32)
  seq_len, batch = 9, 4
  batches = eval_batches(stream, seq_len=seq_len, batch=batch)
  assert len(batches) == 1000 // 10 // 4  # Full batches only.
  expected = stream[: len(batches) * batch * 10].reshape(-1, batch, 10)
  assert all(np.array_equal(b, e) for b, e in zip(batches, expected))
  assert batches[0].dtype == np.int32
  again = eval_batches(stream, seq_len=seq_len, batch=batch)
  assert all(np.array_equal(a, b) for a, b in zip(batches, again))
  assert len(eval_batches(stream, seq_len=seq_len, batch=batch, max_batches=3)) == 3


def test_eval_split_shorter_than_a_batch():
  with pytest.raises(InputError, match="fewer than one eval batch"):
    eval_batches(np.arange(30, dtype=np.int32), seq_len=9, batch=4)


def test_eval_on_real_validation_split(shakespeare_gpt2):
  batches = eval_batches(shakespeare_gpt2.tokens["validation"], seq_len=1024, batch=8)
  assert len(batches) == 36_059 // 1025 // 8
  assert np.array_equal(batches[1][0], shakespeare_gpt2.tokens["validation"][8 * 1025 : 9 * 1025])
