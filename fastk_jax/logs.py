"""Log filtering shared by the command-line entry points."""

from __future__ import annotations

import logging as std_logging

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
