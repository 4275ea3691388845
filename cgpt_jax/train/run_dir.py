"""The run's folder: refused before anything is written when it is not a run of this project,
holds a finished run, or cannot be written; created with its marker once every input is checked."""

import os
import pathlib

from cgpt_jax.errors import InputError

RUN_MARKER = ".cgpt_run"  # written into every workdir this project creates


def is_run_dir(path: pathlib.Path) -> bool:
  """A workdir of this project: its marker, or (runs from before the marker) its own files."""
  return any((path / name).exists() for name in (RUN_MARKER, "checkpoints", "metrics.jsonl"))


def check_workdir(workdir: str, markers=()) -> pathlib.Path:
  """Refuses a workdir this run may not write into: a file, an unwritable place, a folder of files
  that are not a run of this project (an exported model, a dataset), or one holding `markers`.
  Creates nothing: create_workdir does, once every input is checked."""
  if not workdir:
    raise InputError("--workdir is empty. Give the run's folder, e.g. --workdir=runs/shakespeare.")
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise InputError(f"--workdir {path} exists and is not a directory. Choose another path.")
  if path.is_dir() and not is_run_dir(path):
    others = sorted(p.name for p in path.iterdir())
    if others:
      raise InputError(
        f"--workdir {path} holds files that no run of this project wrote "
        f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); refusing to "
        "write into it. Choose a new or empty --workdir."
      )
  found = [m for m in markers if (path / m).exists()]
  if found:
    raise InputError(
      f"--workdir {path} already holds a run ({', '.join(found)} exist); refusing to "
      "overwrite it. Choose a new --workdir or delete the old one."
    )
  ancestor = next(p for p in (path, *path.absolute().parents) if p.exists())
  if not (ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)):
    raise InputError(
      f"--workdir {path} is not writable ({ancestor} is "
      f"{'read-only' if ancestor.is_dir() else 'a file'}). "
      "Choose a directory you can write to."
    )
  return path


def create_workdir(path: pathlib.Path) -> None:
  """The workdir and its marker, once every input has been checked (a refused run leaves none)."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).touch()
  except OSError as e:
    raise InputError(
      f"--workdir {path} cannot be created ({e.strerror}). Choose a directory you can write to."
    ) from None


def check_resumable(out: pathlib.Path) -> None:
  """A workdir may hold an unfinished run only if it has a checkpoint to continue from."""
  if (out / "summary.json").exists():
    raise InputError(
      f"--workdir {out} already holds a run (summary.json: it finished); refusing to "
      "overwrite it. Choose a new --workdir, or raise --config.train.steps and delete "
      "summary.json to train it further."
    )
