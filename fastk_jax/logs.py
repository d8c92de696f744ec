"""Log filtering shared by the command-line entry points."""

from __future__ import annotations

import functools
import logging as std_logging
import sys

from absl import logging

# Libraries that log every checkpoint file operation at INFO level.
_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/tensorstore/")

# Warnings that describe intended use here: TFDS names every custom builder
# config it loads, and Orbax notes each read-only manager that evaluation opens.
_EXPECTED_WARNINGS = (
    ("/tensorflow_datasets/", "Using custom data configuration"),
    ("/orbax/", "Given directory is read only"),
    ("/orbax/", "CheckpointManagerOptions.read_only=True"),
)


class _LibraryInfoFilter(std_logging.Filter):
  """Drop chatty libraries' INFO records and their expected warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno > std_logging.WARNING:
      return True
    if record.levelno == std_logging.WARNING:
      message = str(record.msg)
      return not any(part in record.pathname and message.startswith(prefix)
                     for part, prefix in _EXPECTED_WARNINGS)
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
  """Keep fastk-jax's INFO logs and the libraries' warnings and errors.

  Orbax writes dozens of INFO lines per checkpoint, which would bury the
  training progress lines.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def exit_on_input_error(main):
  """Wrap an absl `main` so that input errors print one line and exit 1.

  Invalid configs, missing files and a diverged loss raise ValueError,
  FileNotFoundError or FloatingPointError with a message that names the field
  or path and the fix. A traceback around it only hides that message. Run
  with --verbosity=1 to log the traceback too.
  """

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
      logging.debug("Traceback of the error below:", exc_info=True)
      sys.exit(f"Error: {err}")

  return wrapped
