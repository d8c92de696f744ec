"""Metric logging to a JSON-lines file and TensorBoard event files.

TensorBoard files are written with tensorboardX, which needs no TensorFlow.
Only process 0 writes; the other processes get a writer that drops metrics.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np


class MetricWriter:
  """Write scalar metrics to `WORKDIR/metrics.jsonl` and `WORKDIR/tensorboard`."""

  def __init__(self, workdir: str, *, filename: str = "metrics.jsonl"):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, filename), "a")
    # Imported here so that processes other than 0 never open event files.
    from tensorboardX import SummaryWriter
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Append one record: `{"step": step, **metrics}`."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    for name, value in metrics.items():
      value = np.asarray(value)
      record[name] = value.tolist()
      if value.ndim == 0:
        self._tensorboard.add_scalar(name, float(value), step)
      else:
        for i, item in enumerate(value.reshape(-1)):
          self._tensorboard.add_scalar(f"{name}/{i}", float(item), step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
      self.enabled = False
