"""Named TFDS datasets that are already prepared in a data_dir: sources of the form
`tfds:NAME[/CONFIG][:VERSION]`.

Training machines have no network, so this never downloads: a dataset that is not prepared is an
error telling the user to prepare it elsewhere. The spec is parsed strictly, which also rules out
community namespaces such as `huggingface:...` whose lookup would go to the network.
"""

import re

import tensorflow_datasets as tfds

from cgpt_jax.errors import InputError

PREFIX = "tfds:"
_SPEC = re.compile(r"[A-Za-z]\w*(/[\w\-.+]+)?(:\d+\.\d+\.\d+)?")
# Formats grain can read by random access without TensorFlow (TFRecord needs TensorFlow).
_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def is_catalogue_source(source: str) -> bool:
  return source.startswith(PREFIX)


def load_prepared_builder(source: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of catalogue source `source` ('tfds:NAME[/CONFIG][:VERSION]'), prepared in
  `data_dir`."""
  spec = source[len(PREFIX) :]
  if not _SPEC.fullmatch(spec):
    raise InputError(
      f"data source {source!r} is not of the form tfds:NAME[/CONFIG][:VERSION] "
      "(e.g. tfds:tiny_shakespeare or tfds:wikitext/wikitext-2-raw-v1:1.0.0)"
    )
  how_to_prepare = (
    f"prepare it first on a machine with network, e.g. `tfds build {spec} "
    f"--data_dir={data_dir} --file_format=array_record`; this trainer never downloads"
  )
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
  except ValueError as e:
    # DatasetNotFoundError (a ValueError) goes on to list the whole catalogue, an unknown config the
    # closest config names; the first sentence says what is wrong.
    reason = str(e).splitlines()[0].split(" Here are ")[0]
    raise InputError(
      f"TFDS dataset {spec} is neither in the catalogue nor prepared in data_dir "
      f"{data_dir} ({reason}); {how_to_prepare}"
    ) from e
  if not builder.is_prepared():
    raise InputError(
      f"TFDS dataset {spec} is not prepared in data_dir {data_dir}; {how_to_prepare}"
    )
  file_format = builder.info.file_format.value
  if file_format not in _RANDOM_ACCESS_FORMATS:
    raise InputError(
      f"TFDS dataset {spec} in {data_dir} was prepared as {file_format}, which needs "
      f"TensorFlow to read; prepare it again with --file_format=array_record"
    )
  return builder
