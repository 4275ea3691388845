"""The exceptions that end a run with a message instead of a traceback, and their exit codes.

Anything a user can fix (a config value, a layout, a data path, a workdir) raises `InputError` with
a message that says what is wrong, where, and how to fix it. launch.py turns it into exit code 2
before anything is compiled or written; every other exception is a bug and exits 1. A run that
diverges (`Diverged`, exit 3) or is asked to stop by a signal (`Stopped`, 128 + the signal's number)
has saved its last finite state first.
"""


class InputError(Exception):
  """Bad configuration or bad input: launch.py prints the message and exits with code 2."""


class Diverged(Exception):
  """The loss, the gradients or the parameters became non-finite: exit code 3."""

  exit_code = 3


class Stopped(Exception):
  """SIGTERM or SIGINT: the run saved a checkpoint and says how to resume; exit 128 + signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum
