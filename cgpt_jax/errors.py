"""The one exception type for bad input.

Anything a user can fix (a config value, a layout, a data path, a workdir) raises `InputError` with a
message that says what is wrong, where, and how to fix it. launch.py turns it into exit code 2 before
anything is compiled or written; every other exception is a bug and exits 1.
"""


class InputError(Exception):
  """Bad configuration or bad input: launch.py prints the message and exits with code 2."""
