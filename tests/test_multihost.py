"""Two JAX processes on localhost train, checkpoint and resume like one.

The multi-process run starts 2 processes with 4 CPU devices each through
`launch/local_multiprocess.py` (gloo collectives, explicit
`--coordinator_address/--num_processes/--process_id`). It stops at step 3,
resumes to step 6, and is compared with one process on 8 devices that reads
the same global batches.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fastk_jax import checkpointing
from fastk_jax import data as data_lib
from fastk_jax import train

from conftest import CACHE_DIR, ROOT, load_config

NUM_PROCESSES = 2
MESH_OVERRIDES = {"mesh.preset": "tp", "mesh.shape": (2, 1, 4)}
# Per-process launch limit: start-up, data preparation and compilation take
# about 30 s on a 2-core CPU.
LAUNCH_TIMEOUT_SECONDS = 300


def _launch(text_dir, workdir, *extra_flags):
  """Run tiny-config training in 2 processes; return the launcher's result."""
  command = [
      sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"),
      f"--num_processes={NUM_PROCESSES}", "--cpu_devices_per_process=4",
      f"--log_dir={os.path.join(workdir, 'logs')}", "--",
      sys.executable, "-m", "fastk_jax.train",
      f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}:"
      f"text_dir={text_dir}",
      f"--config.data.cache_dir={CACHE_DIR}",
      f"--config.mesh.preset={MESH_OVERRIDES['mesh.preset']}",
      f"--config.mesh.shape={MESH_OVERRIDES['mesh.shape']}",
      f"--workdir={workdir}", *extra_flags,
  ]
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_SECONDS)
  logs = []
  for process_id in range(NUM_PROCESSES):
    path = os.path.join(workdir, "logs", f"process_{process_id}.log")
    if os.path.exists(path):
      with open(path) as f:
        logs.append(f.read())
  tails = "".join(f"--- process {i} ---\n{log[-3000:]}\n"
                  for i, log in enumerate(logs))
  assert result.returncode == 0, result.stdout + result.stderr + tails
  return "\n".join(logs)


class _ProcessBatches:
  """One process's view of an N-process job: the N local batches, in order.

  Process i of N owns rows [i * B / N, (i + 1) * B / N) of the global batch,
  because it owns the first devices of the mesh's data axis. Concatenating
  the N processes' local batches therefore gives the global batch that the
  multi-process run trains on.
  """

  def __init__(self, iterators):
    self._iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(it) for it in self._iterators]
    return {key: np.concatenate([b[key] for b in batches])
            for key in batches[0]}

  # The Grain checkpoint handler stores `get_state()` bytes per process.
  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self._iterators]).encode()

  def set_state(self, state: bytes) -> None:
    for it, it_state in zip(self._iterators, json.loads(state)):
      it.set_state(it_state)

  def start_prefetch(self) -> None:
    pass


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {(r["step"], "loss" in r): r for r in map(json.loads, f)}


@pytest.mark.skipif(jax.device_count() != 8,
                    reason="the one-process reference needs 8 devices")
def test_two_processes_match_one_process(kjv_text_dir, tmp_path, monkeypatch):
  multi = str(tmp_path / "two_processes")

  # Two processes: stop at step 3, then resume from that checkpoint to step 6.
  logs = _launch(kjv_text_dir, multi, "--stop_at_step=3")
  assert "Stopped at step 3" in logs
  data_dir = os.path.join(checkpointing.checkpoint_dir(multi), "3", "data")
  for process_id in range(NUM_PROCESSES):
    state_file = f"process_{process_id}-of-{NUM_PROCESSES}.json"
    assert os.path.exists(os.path.join(data_dir, state_file)), state_file
  logs = _launch(kjv_text_dir, multi)
  assert "Resuming at step 3" in logs

  # One process, 8 devices, the same mesh, tokenizer and global batches.
  single = str(tmp_path / "one_process")
  shutil.copytree(os.path.join(multi, "tokenizer"),
                  os.path.join(single, "tokenizer"))
  make_iterator = data_lib.make_train_iterator

  def two_process_batches(config, tok, **kwargs):
    return _ProcessBatches([
        make_iterator(config, tok, process_index=i,
                      process_count=NUM_PROCESSES, **kwargs)
        for i in range(NUM_PROCESSES)])

  monkeypatch.setattr(data_lib, "make_train_iterator", two_process_batches)
  config = load_config("tiny", f"text_dir={kjv_text_dir}", **MESH_OVERRIDES)
  train.train_and_evaluate(config, single)

  # Losses of the same steps: step 2 (steps 1-2 averaged), step 6 (steps 5-6;
  # the resumed run logs steps 4 and 6), and validation at steps 4 and 6.
  multi_records, single_records = _records(multi), _records(single)
  for step, key in ((2, "loss"), (6, "loss"), (4, "val_oracle_nll"),
                    (6, "val_oracle_nll")):
    is_train = key == "loss"
    np.testing.assert_allclose(
        multi_records[(step, is_train)][key],
        single_records[(step, is_train)][key], rtol=1e-5,
        err_msg=f"{key} at step {step}")

  multi_state = checkpointing.load_inference_state(multi)
  single_state = checkpointing.load_inference_state(single)
  assert multi_state.step == single_state.step == 6
  np.testing.assert_array_equal(multi_state.win_counts, single_state.win_counts)
  multi_params = nnx.state(multi_state.model, nnx.Param)
  single_params = nnx.state(single_state.model, nnx.Param)
  for (path, got), want in zip(
      jax.tree_util.tree_leaves_with_path(multi_params),
      jax.tree.leaves(single_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("env,expected", [
    # One task per GPU, each seeing all 8: JAX's own choice (GPU SLURM_LOCALID).
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
      "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, None),
    # One task per node: all of the node's GPUs.
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"},
     [0, 1, 2, 3]),
    # Uneven nodes: node 1 of "2,1(x2)" runs one task.
    ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_STEP_TASKS_PER_NODE": "2,1(x2)",
      "SLURM_NODEID": "1"}, [0, 1]),
    # SLURM bound one GPU to the task (--gpus-per-task=1).
    ({"CUDA_VISIBLE_DEVICES": "5", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
      "SLURM_LOCALID": "5"}, [0]),
    # CPU-only nodes, and an explicit JAX_LOCAL_DEVICE_IDS: JAX's choice.
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_STEP_TASKS_PER_NODE": "1",
      "JAX_LOCAL_DEVICE_IDS": "0"}, None),
])
def test_slurm_local_device_ids(env, expected, monkeypatch):
  from fastk_jax import distributed
  for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_TASKS_PER_NODE",
               "SLURM_TASKS_PER_NODE", "SLURM_NODEID", "SLURM_LOCALID",
               "JAX_LOCAL_DEVICE_IDS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.slurm_local_device_ids() == expected


def test_slurm_detection_needs_srun_tasks(monkeypatch):
  from fastk_jax import distributed
  monkeypatch.setenv("SLURM_JOB_ID", "42")
  monkeypatch.setenv("SLURM_NTASKS", "16")
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
  # A batch script's own process has no SLURM_PROCID: one process.
  monkeypatch.delenv("SLURM_PROCID", raising=False)
  assert distributed.slurm_num_tasks() == 0
  monkeypatch.setenv("SLURM_PROCID", "3")
  assert distributed.slurm_num_tasks() == 16


@pytest.mark.parametrize("kwargs,message", [
    ({"coordinator_address": "127.0.0.1:1234"}, "Set all of"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
      "process_id": 2}, "Invalid --process_id=2"),
    ({"coordinator_address": "localhost", "num_processes": 2,
      "process_id": 0}, "HOST:PORT"),
])
def test_initialize_rejects_invalid_flags(kwargs, message):
  from fastk_jax import distributed
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)


def test_tpu_pod_launcher_prints_command():
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--tpu=my-v4-32",
       "--zone=us-central2-b", "--dry_run", "--", "python", "-m",
       "fastk_jax.train", "--config=configs/gpt2_small.py",
       "--workdir=gs://b/r"],
      capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  printed = result.stdout
  assert printed.startswith("gcloud compute tpus tpu-vm ssh my-v4-32 ")
  assert "--worker=all" in printed
  assert "fastk_jax.train" in printed


def test_local_launcher_appends_distributed_flags():
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  try:
    import local_multiprocess
  finally:
    sys.path.pop(0)
  args = local_multiprocess.parse_args(
      ["--num_processes=3", "--", "python", "-m", "fastk_jax.train"])
  command = local_multiprocess.process_command(args.command, 1234, 3, 2)
  assert command == ["python", "-m", "fastk_jax.train",
                     "--coordinator_address=127.0.0.1:1234",
                     "--num_processes=3", "--process_id=2"]
