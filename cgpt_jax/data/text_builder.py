"""Local text files as a tensorflow-datasets dataset (array_record, so no TensorFlow is needed).

Going through TFDS gives us a prepared, versioned, random-access copy of the corpus in the data_dir
that grain reads directly, and the same reading path as for catalogue datasets (see catalogue.py).

Each file is one document. Its first int(n * 0.9) characters are its train record and the rest its
validation record (nanoGPT's `data[:int(n*0.9)]` split, applied per file so that every file, not
just the last ones, contributes to validation). A record holds the whole piece, so tokenization is
never cut in the middle of a document.
"""

import dataclasses
import glob
import hashlib
import logging
import os
import pathlib
import re

import tensorflow_datasets as tfds

from cgpt_jax.errors import InputError

log = logging.getLogger(__name__)

TRAIN_FRACTION = 0.9
SPLITS = ("train", "validation")
_GLOB_CHARS = frozenset("*?[")


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
  """A config is one resolved list of files; its name is a fingerprint of them (see
  prepare_text_dataset)."""

  # Kept out of repr: TFDS logs the config on every load and a folder can hold many files.
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Local text files, one document per file, split 90% / 10% by characters within each file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Per-file 90/10 character split; UTF-8 with latin-1 fallback; CRLF -> LF."
  }
  # TFDS derives a code path only to find a checksums.tsv for verifying downloads. For a class
  # inside a package that derivation imports the `importlib_resources` backport, which is not
  # installed, and this builder downloads nothing, so it has no code path (TFDS handles None as
  # "no checksums").
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Local text files, one record per (file, split).",
      features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "source": tfds.features.Text()}
      ),
      # Records keep file order (sorted paths) so the token stream reads the corpus in order.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are local.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    for index, path in enumerate(self.builder_config.files):
      text, _ = decode_text(read_bytes(path))
      piece = split_text(text)[SPLITS.index(split)]
      # A one-character file has no train piece; an empty record would only add a bare separator.
      if piece:
        yield index, {"text": piece, "source": path}


def prepare_text_dataset(source: str, data_dir: str, allow_binary: bool = False) -> LocalText:
  """The prepared LocalText dataset of `source` (a file, a glob or a folder) inside `data_dir`.

  Every file is read and checked before anything is written. The config name is a sha256 over each
  file's absolute path and bytes: an unchanged corpus is prepared once and then reused, and any edit
  gives a new config. Contents rather than size + mtime because copies, checkouts and `cp -p` make
  mtimes unreliable and a stale dataset would be silently wrong; hashing a text corpus costs
  milliseconds, and the whole corpus is read into memory for training anyway.
  """
  files = resolve_files(source)
  digest = hashlib.sha256()
  train_chars = 0
  for path in files:
    raw = read_bytes(path)
    text, encoding = decode_text(raw)
    if not text:
      raise InputError(f"data file {path} is empty; remove it or point the data source elsewhere")
    if not allow_binary and looks_binary(raw):
      raise InputError(
        f"data file {path} looks binary, not text (NUL or other control bytes in its "
        "first 64 KiB); point the data source at text files, or set "
        "--config.data.allow_binary=True to train on its bytes anyway"
      )
    if encoding != "utf-8":
      log.warning("data file %s is not valid UTF-8; read it as %s", path, encoding)
    train_chars += len(split_text(text)[0])
    digest.update(f"{path}\0{len(raw)}\0".encode())
    digest.update(raw)
  if not train_chars:
    raise InputError(
      f"data source {source} is too small to split: every file has a single character, "
      "so the train split would be empty; use more text"
    )
  config = LocalTextConfig(
    name=f"{_slug(source)}-{digest.hexdigest()[:16]}",
    description=f"{len(files)} file(s) from {source}",
    files=tuple(files),
  )
  try:
    builder = LocalText(config=config, data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
  except Exception as e:  # a damaged dataset_info.json or features.json: TFDS raises many kinds
    folder = os.path.join(data_dir, LocalText.name, config.name)
    raise InputError(
      f"the prepared dataset in {folder} cannot be read ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:200] if str(e) else ''}). Delete that folder to "
      "prepare it again."
    ) from None
  if not prepared:
    _check_writable(data_dir)
    builder.download_and_prepare()
  return builder


def resolve_files(source: str) -> list[str]:
  """Absolute paths of the files `source` names: the file itself, a glob's matches, a folder's
  files.

  Glob matches and folder entries skip README* files (the gutenberg folder's README is the Project
  Gutenberg licence header, not corpus text) and hidden files (.DS_Store and the like). Folders are
  not searched recursively. A file named explicitly is always taken.
  """
  expanded = os.path.expanduser(source)
  if _GLOB_CHARS & set(expanded):
    matches = sorted(glob.glob(expanded))
    files = [m for m in matches if os.path.isfile(m) and _is_corpus_file(m)]
    if not files:
      what = (
        "no files"
        if not matches
        else f"no text files (only {len(matches)} folders or README/hidden files)"
      )
      raise InputError(f"data source glob {source} matched {what}; check the pattern")
  elif os.path.isdir(expanded):
    entries = sorted(os.path.join(expanded, name) for name in os.listdir(expanded))
    files = [e for e in entries if os.path.isfile(e) and _is_corpus_file(e)]
    if not files:
      raise InputError(
        f"data source folder {source} holds no text files (README and hidden files are "
        "skipped, subfolders are not searched); point it at a folder of .txt files"
      )
  elif os.path.isfile(expanded):
    files = [expanded]
  elif os.path.exists(expanded):
    raise InputError(
      f"data source {source} is not a regular file or folder (a device, pipe or "
      "socket); give a text file, a folder of text files, or a glob"
    )
  else:
    raise InputError(
      f"data source {source} does not exist; give a text file, a folder of text files, "
      "a glob such as 'corpus/*.txt', or 'tfds:NAME' for a prepared TFDS dataset"
    )
  return [os.path.abspath(f) for f in files]


def read_bytes(path: str) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise InputError(f"cannot read data file {path} ({e.strerror}); check its permissions") from e


def decode_text(raw: bytes) -> tuple[str, str]:
  """(text, encoding): UTF-8, else latin-1, which decodes any bytes, so old corpora (two gutenberg
  books) load instead of crashing. CRLF becomes LF so that Windows line endings (moby dick) neither
  add a '\\r' character to the vocabulary nor change tokenization."""
  try:
    # utf-8-sig also drops a leading byte-order mark, which would otherwise become a token.
    text, encoding = raw.decode("utf-8-sig"), "utf-8"
  except UnicodeDecodeError:
    text, encoding = raw.decode("latin-1"), "latin-1"
  return text.replace("\r\n", "\n"), encoding


def looks_binary(raw: bytes) -> bool:
  """A NUL byte, or more than 1% of control bytes other than whitespace, in the first 64 KiB: text
  in any 8-bit encoding has almost none; executables, archives and arrays are full of them."""
  head = raw[:65536]
  controls = sum(head.count(bytes([c])) for c in range(32) if chr(c) not in "\t\n\r\f\v")
  return b"\0" in head or controls > 0.01 * len(head)


def split_text(text: str) -> tuple[str, str]:
  """(train, validation) pieces of one document: nanoGPT's `data[:int(n*0.9)]` / rest."""
  cut = int(len(text) * TRAIN_FRACTION)
  return text[:cut], text[cut:]


def _is_corpus_file(path: str) -> bool:
  name = os.path.basename(path)
  return not (name.upper().startswith("README") or name.startswith("."))


def _slug(source: str) -> str:
  """A readable config-name prefix: the last path component without glob characters."""
  parts = [p for p in pathlib.Path(source).parts if not _GLOB_CHARS & set(p)]
  stem = pathlib.Path(parts[-1]).stem if parts else ""
  return re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "text"


def _check_writable(data_dir: str) -> None:
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise InputError(
      f"cannot create the data_dir {data_dir} ({e.strerror}); choose a writable folder"
    ) from e
  if not os.access(data_dir, os.W_OK):
    raise InputError(f"data_dir {data_dir} is not writable; choose a writable folder")
