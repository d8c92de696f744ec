"""Log filtering shared by the command-line entry points."""

from __future__ import annotations

import logging as std_logging

from absl import logging

# Libraries that log every checkpoint file operation at INFO level.
_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/tensorstore/")


class _LibraryInfoFilter(std_logging.Filter):
  """Drop INFO and DEBUG records that come from chatty libraries."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
  """Keep fastk-jax's INFO logs and the libraries' warnings and errors.

  Orbax writes dozens of INFO lines per checkpoint, which would bury the
  training progress lines.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())
