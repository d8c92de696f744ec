"""Multi-process start-up: `jax.distributed` and per-process logging.

Every process of a multi-host job runs the same command and calls
`initialize()` before anything else touches JAX devices. Three cases:

* explicit: `--coordinator_address=HOST:PORT --num_processes=N
  --process_id=I` on every process (`launch/local_multiprocess.py` adds
  them), for clusters JAX cannot detect and for tests on one machine;
* automatic: on a Cloud TPU VM (libtpu installed) and in a SLURM job step
  with more than one task, `jax.distributed.initialize()` without arguments
  reads the topology from the TPU metadata or the SLURM variables;
* single process: nothing to do.

After start-up only process 0 logs at INFO level, and the others log
warnings and errors. An N-host job thus prints one progress line per step.
"""

from __future__ import annotations

import importlib.util
import os
import re

import jax
from absl import flags
from absl import logging

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0's coordinator, the same on every process. Set it "
    "with --num_processes and --process_id for an explicit multi-process "
    "start; leave all three unset to auto-detect TPU VMs and SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Total number of JAX processes in the job.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, --num_processes).")
_AUTO_DETECT = flags.DEFINE_bool(
    "distributed_auto_detect", True,
    "Without the explicit flags, call jax.distributed.initialize() when the "
    "environment is a Cloud TPU VM or a multi-task SLURM job step.")


def slurm_num_tasks() -> int:
  """Return the task count of the current SLURM job step, or 0 outside one.

  `SLURM_PROCID` is set only for processes that `srun` started. A batch
  script that runs python without srun is one process, whatever the value
  of `SLURM_NTASKS`, and must not wait for the others.
  """
  if "SLURM_JOB_ID" not in os.environ or "SLURM_PROCID" not in os.environ:
    return 0
  return int(os.environ.get("SLURM_STEP_NUM_TASKS",
                            os.environ.get("SLURM_NTASKS", "1")))


def slurm_tasks_on_this_node() -> int | None:
  """Return how many tasks of the job step run on this node, or None.

  Parses `SLURM_STEP_TASKS_PER_NODE` (or `SLURM_TASKS_PER_NODE`), whose
  form is like "2(x3),1": 2 tasks on each of 3 nodes, then 1 task.
  """
  spec = (os.environ.get("SLURM_STEP_TASKS_PER_NODE")
          or os.environ.get("SLURM_TASKS_PER_NODE"))
  if not spec:
    return None
  counts = []
  for part in spec.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if not match:
      return None
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  node = int(os.environ.get("SLURM_NODEID", "0"))
  return counts[node] if node < len(counts) else None


def visible_gpu_count() -> int | None:
  """Return the number of GPUs in `CUDA_VISIBLE_DEVICES`, or None if unset."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is None:
    return None
  return len([d for d in visible.split(",") if d.strip()])


def slurm_local_device_ids() -> list[int] | None:
  """Return the local GPU ids this SLURM task should use, or None for JAX's.

  Under SLURM, `jax.distributed.initialize()` assumes one process per GPU
  and keeps only GPU `SLURM_LOCALID` visible. That is wrong in two layouts:

  * one task per node: the task would see a single GPU, not the node's;
  * SLURM binds one GPU per task (`--gpus-per-task=1`): the task's only GPU
    has index 0, so GPU `SLURM_LOCALID` does not exist for local ids > 0.

  Both cases are read from `CUDA_VISIBLE_DEVICES`, which SLURM sets for GPU
  jobs. Returns None (JAX's choice) when it is unset, as on CPU-only nodes,
  and when `JAX_LOCAL_DEVICE_IDS` sets the ids explicitly.
  """
  if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  num_gpus = visible_gpu_count()
  if num_gpus is None or num_gpus == 0:
    return None
  if num_gpus == 1:
    return [0]
  if slurm_tasks_on_this_node() == 1:
    return list(range(num_gpus))
  return None


def on_cloud_tpu_vm() -> bool:
  """Return True when libtpu is installed, as on Cloud TPU VMs.

  JAX itself then reads the worker list from the TPU VM metadata.
  """
  return importlib.util.find_spec("libtpu") is not None


def detected_cluster() -> str | None:
  """Return "slurm" or "tpu" if `jax.distributed` can configure itself."""
  if slurm_num_tasks() > 1:
    return "slurm"
  if on_cloud_tpu_vm():
    return "tpu"
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               auto_detect: bool = True) -> None:
  """Start `jax.distributed` if this is a multi-process job; see module doc.

  Call it once per process before any JAX computation. Calling it again, or
  after `jax.distributed` was started elsewhere, only reapplies the logging
  setting.

  Args:
    coordinator_address: "HOST:PORT" of process 0, or None.
    num_processes: total processes, or None.
    process_id: this process's index, or None.
    auto_detect: allow the TPU VM and SLURM auto-detection when the explicit
      arguments are unset.

  Raises:
    ValueError: if only some explicit arguments are set or they are invalid.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if jax.distributed.is_initialized():
    pass
  elif any(value is not None for value in explicit):
    _initialize_explicit(coordinator_address, num_processes, process_id)
  elif auto_detect and (cluster := detected_cluster()):
    logging.info("Detected a %s cluster; starting jax.distributed.", cluster)
    if cluster == "slurm":
      # NOTE: the SLURM layouts are unit-tested on environment variables
      # only, not on a real SLURM cluster.
      jax.distributed.initialize(local_device_ids=slurm_local_device_ids())
    else:
      jax.distributed.initialize()
  else:
    return  # One process: nothing to coordinate.

  _log_from_process_zero_only()
  logging.info("JAX process %d of %d, %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def _initialize_explicit(coordinator_address, num_processes, process_id):
  if None in (coordinator_address, num_processes, process_id):
    raise ValueError(
        "Set all of --coordinator_address, --num_processes and --process_id "
        f"for an explicit multi-process start; got coordinator_address="
        f"{coordinator_address!r}, num_processes={num_processes!r}, "
        f"process_id={process_id!r}.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
        f"Invalid --process_id={process_id} for --num_processes="
        f"{num_processes}: use an index in [0, {num_processes}).")
  if ":" not in coordinator_address:
    raise ValueError(
        f"Invalid --coordinator_address={coordinator_address!r}: use "
        "HOST:PORT, for example 127.0.0.1:12355.")
  if num_processes == 1:
    return
  logging.info("Starting jax.distributed: process %d of %d, coordinator %s.",
               process_id, num_processes, coordinator_address)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)


def _log_from_process_zero_only() -> None:
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def initialize_from_flags() -> None:
  """Call `initialize` with the command-line flags of this module."""
  initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
             _PROCESS_ID.value, auto_detect=_AUTO_DETECT.value)
