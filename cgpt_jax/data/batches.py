"""From a data source to batches: tokenize a prepared TFDS dataset into one token stream per split,
then cut the stream into [rows, seq_len + 1] windows (inputs = w[:-1], targets = w[1:]).

Training batches come from a grain MapDataset, i.e. by random access: batch k is a pure function of
(tokens, seq_len, global_batch, seed, k). Resuming at step k therefore needs no iterator state in
the checkpoint, only the step number, and every process computes its own rows of the same global
batch without talking to the others.
"""

import dataclasses
import functools
import itertools
from collections.abc import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds

from cgpt_jax.data import catalogue
from cgpt_jax.data.text_builder import SPLITS, prepare_text_dataset
from cgpt_jax.data.tokenizers import Tokenizer, make_tokenizer
from cgpt_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The tokenizer and each split's token stream (int32, documents joined by tokenizer.eot_id)."""

  tokenizer: Tokenizer
  tokens: dict[str, np.ndarray]


def load_corpus(
  source: str,
  data_dir: str,
  tokenizer_kind: str,
  tokenizer_path: str | None = None,
  *,
  text_key: str = "text",
  allow_binary: bool = False,
) -> Corpus:
  """Tokenize the 'train' and 'validation' splits of `source`.

  `source` is a local text file, folder or glob (prepared into `data_dir` on first use, see
  text_builder.py), or 'tfds:NAME[/CONFIG][:VERSION]' for a catalogue dataset already prepared in
  `data_dir`, whose records are taken as documents and whose feature `text_key` holds the text.
  Local files that look binary are refused unless `allow_binary`.
  """
  # Fixed-vocabulary tokenizers are built first, so that a bad kind or path fails before anything
  # is prepared.
  tokenizer = (
    None if tokenizer_kind == "char" else make_tokenizer(tokenizer_kind, path=tokenizer_path)
  )
  if catalogue.is_catalogue_source(source):
    builder = catalogue.load_prepared_builder(source, data_dir)
  else:
    builder = prepare_text_dataset(source, data_dir, allow_binary=allow_binary)
  _check_layout(builder, source, text_key)
  documents = _read_documents(builder, text_key)
  if tokenizer is None:
    # Like nanoGPT's shakespeare_char: the vocabulary is every character of train AND validation.
    tokenizer = make_tokenizer("char", corpus_text="".join(itertools.chain(*documents.values())))
  tokens = {
    split: _join([tokenizer.encode(d) for d in documents[split]], tokenizer.eot_id)
    for split in SPLITS
  }
  return Corpus(tokenizer=tokenizer, tokens=tokens)


def _read_documents(builder: tfds.core.DatasetBuilder, text_key: str) -> dict[str, list[str]]:
  """Every record's text, by split; a prepared copy that cannot be read names the folder to delete
  (it is prepared again on the next run, or is to be prepared again with `tfds build`)."""
  try:
    data_sources = builder.as_data_source()
    return {
      split: list(
        grain.MapDataset.source(data_sources[split]).map(functools.partial(_text, key=text_key))
      )
      for split in SPLITS
    }
  except Exception as e:  # array_record, protobuf and TFDS raise many kinds for damaged files
    message = str(e).splitlines()[0] if str(e) else ""
    raise InputError(
      f"the prepared dataset in {builder.data_dir} cannot be read ({type(e).__name__}: "
      f"{message[:200]}). Delete that folder to prepare it again."
    ) from None


def train_batches(
  tokens: np.ndarray,
  *,
  seq_len: int,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[np.ndarray]:
  """This process's rows of every global training batch from `start_step` on, forever.

  Yields int32 [global_batch // process_count, seq_len + 1]; process p gets rows
  p * B/P ... (p + 1) * B/P - 1 of each global batch. The stream is cut into windows of seq_len + 1
  tokens; each epoch visits every window once in an order shuffled by grain from the seed, and the
  global batches run through the epochs back to back (a batch may span two epochs).

  Each epoch also shifts the whole window grid by an offset in [0, seq_len] drawn from the seed, so
  that across epochs the model sees different window boundaries instead of always the same
  contexts. To have the same number of windows W at every offset, W = (n - seq_len) // (seq_len + 1)
  (at most one window fewer than an unshifted grid); a split too short for that has one window and
  offsets in [0, n - seq_len - 1].
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  _check_train_batches(
    len(tokens), seq_len, global_batch, seed, start_step, process_index, process_count
  )
  window = seq_len + 1
  windows_per_epoch = max(1, (len(tokens) - seq_len) // window)
  max_offset = min(seq_len, len(tokens) - windows_per_epoch * window)
  # grain seeds epoch e's shuffle with (seed + e), so user seeds s and s + 1 would share all but
  # one epoch order; spreading the user seed through a SeedSequence keeps neighbouring seeds
  # independent.
  shuffle_seed, offset_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

  @functools.lru_cache(maxsize=2)  # A batch touches at most two epochs.
  def epoch_offset(epoch: int) -> int:
    return int(np.random.default_rng([offset_seed, epoch]).integers(max_offset + 1))

  def cut(position: int, window_index: int) -> np.ndarray:
    start = epoch_offset(position // windows_per_epoch) + window_index * window
    return tokens[start : start + window]

  rows = global_batch // process_count
  # repeat() after shuffle() gives every epoch its own permutation; map_with_index sees the position
  # in the endless stream, hence the epoch. Batching per process and then taking every P-th batch
  # starting at p makes batch k of process p rows p * rows ... of global batch k. The P-th batch is
  # taken by index: grain's slice of an endless dataset of single-row batches overflows its length.
  batches = (
    grain.MapDataset.range(windows_per_epoch)
    .shuffle(seed=shuffle_seed)
    .repeat()
    .map_with_index(cut)
    .batch(rows)
  )
  return (batches[step * process_count + process_index] for step in itertools.count(start_step))


def _check_train_batches(
  n_tokens: int,
  seq_len: int,
  global_batch: int,
  seed: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> None:
  _check_positive(seq_len=seq_len, global_batch=global_batch, process_count=process_count)
  if n_tokens < seq_len + 1:
    raise InputError(
      f"the train split has {n_tokens} tokens, fewer than one window of seq_len + 1 = "
      f"{seq_len + 1}; lower --config.data.seq_len or use a larger corpus"
    )
  if global_batch % process_count:
    raise InputError(
      f"global batch {global_batch} is not divisible by the {process_count} processes; "
      "make it a multiple of the process count"
    )
  if not 0 <= process_index < process_count:
    raise InputError(f"process index {process_index} is outside [0, {process_count})")
  if seed < 0 or start_step < 0:
    raise InputError(f"seed ({seed}) and start step ({start_step}) must be >= 0")


def eval_batches(
  tokens: np.ndarray, *, seq_len: int, batch: int, max_batches: int | None = None
) -> list[np.ndarray]:
  """Evaluation batches, int32 [batch, seq_len + 1], the same on every call.

  Windows are consecutive and non-overlapping from the start of the split. The tail shorter than a
  window and the last batch if it is not full are dropped, so every batch has the same shape (one
  compiled eval step); at most batch * (seq_len + 1) - 1 tokens go unused. At most `max_batches`.
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  _check_positive(seq_len=seq_len, batch=batch)
  if max_batches is not None and max_batches < 1:
    raise InputError(f"max eval batches must be >= 1 or unset, got {max_batches}")
  window = seq_len + 1
  num_batches = len(tokens) // window // batch
  if not num_batches:
    raise InputError(
      f"the evaluation split has {len(tokens)} tokens, fewer than one eval batch of "
      f"{batch} windows of seq_len + 1 = {window}; lower --config.data.eval_batch or "
      "--config.data.seq_len, or use a larger corpus"
    )
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  return list(tokens[: num_batches * batch * window].reshape(num_batches, batch, window))


def _check_layout(builder: tfds.core.DatasetBuilder, source: str, text_key: str) -> None:
  """The dataset must have both splits and a text feature `text_key`."""
  missing = [split for split in SPLITS if split not in builder.info.splits]
  if missing:
    raise InputError(
      f"data source {source} has no {' or '.join(missing)} split (it has "
      f"{', '.join(builder.info.splits)}); use a dataset with train and validation splits"
    )
  features = builder.info.features
  if text_key not in features or not isinstance(features[text_key], tfds.features.Text):
    raise InputError(
      f"data source {source} has no text feature {text_key!r} (features: "
      f"{', '.join(features)}); set the text key to one of its text features"
    )


def _text(record: dict, key: str) -> str:
  # Text features come back from array_record as UTF-8 bytes (decoding to str needs TensorFlow).
  value = record[key]
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _join(documents: list[np.ndarray], eot_id: int | None) -> np.ndarray:
  """Concatenate documents, with eot_id between consecutive ones (not after the last), skipping
  empty documents so they never produce two separators in a row."""
  documents = [d for d in documents if d.size]
  if eot_id is not None:
    separator = np.array([eot_id], dtype=np.int32)
    documents = [
      piece for i, d in enumerate(documents) for piece in ((separator, d) if i else (d,))
    ]
  return np.concatenate(documents) if documents else np.zeros(0, np.int32)


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise InputError(f"{name} must be >= 1, got {value}")
