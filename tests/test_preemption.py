"""A real SIGTERM stops training cleanly with a checkpoint, and a rerun resumes.

Training runs in subprocesses, as `python -m fastk_jax.train`, on the tiny
config with many steps so that the signal always arrives mid-run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fastk_jax import checkpointing

from conftest import CACHE_DIR, ROOT

# Seconds to wait for start-up and the first steps (data preparation and
# compilation take about 20 s on a 2-core CPU), and then for the exit.
PROGRESS_TIMEOUT_SECONDS = 240
EXIT_TIMEOUT_SECONDS = 120
# Steps logged before the signal is sent.
PROGRESS_STEPS = 3


def _train_command(text_dir, workdir, *extra_flags):
  return [
      sys.executable, "-m", "fastk_jax.train",
      f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}:"
      f"text_dir={text_dir},steps=100000",
      f"--config.data.cache_dir={CACHE_DIR}",
      "--config.log_every=1",  # A metrics record per step shows progress.
      "--config.checkpoint_every=100000",  # Only the stop writes a checkpoint.
      "--config.eval_every=100000",
      f"--workdir={workdir}", *extra_flags,
  ]


def _env(**extra):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)


def _wait_for_step(workdir, process, step):
  """Wait until metrics.jsonl has a record for `step` or later."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + PROGRESS_TIMEOUT_SECONDS
  while time.monotonic() < deadline:
    assert process.poll() is None, (
        f"training exited early with code {process.returncode}")
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
      if steps and max(steps) >= step:
        return max(steps)
    time.sleep(0.2)
  process.kill()
  pytest.fail(f"no training progress in {PROGRESS_TIMEOUT_SECONDS} s")


def _stopped_step(log):
  steps = re.findall(r"Stopped at step (\d+)", log)
  assert steps, log[-3000:]
  return int(steps[-1])


def _read(path):
  with open(path) as f:
    return f.read()


def test_sigterm_saves_and_rerun_resumes(kjv_text_dir, tmp_path):
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "train.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(_train_command(kjv_text_dir, workdir),
                               env=_env(), cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    seen_step = _wait_for_step(workdir, process, PROGRESS_STEPS)
    process.send_signal(signal.SIGTERM)
    return_code = process.wait(timeout=EXIT_TIMEOUT_SECONDS)
  log = _read(log_path)
  assert return_code == 0, log[-3000:]
  assert "Received SIGTERM" in log

  stopped = _stopped_step(log)
  assert stopped >= seen_step
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == [
      str(stopped)]

  # The rerun resumes from the stop's checkpoint and runs 2 more steps.
  result = subprocess.run(
      _train_command(kjv_text_dir, workdir, f"--stop_at_step={stopped + 2}"),
      env=_env(), cwd=ROOT, capture_output=True, text=True,
      timeout=PROGRESS_TIMEOUT_SECONDS)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log[-3000:]
  assert f"Resuming at step {stopped}." in log
  assert _stopped_step(log) == stopped + 2
  manager = checkpointing.make_manager(workdir, {}, read_only=True)
  assert manager.latest_step() == stopped + 2


def test_sigterm_to_one_process_stops_all(kjv_text_dir, tmp_path):
  """SIGTERM to process 1 only: both processes stop after the same step."""
  workdir = str(tmp_path / "run")
  log_dir = tmp_path / "logs"
  command = [
      sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"),
      "--num_processes=2", "--cpu_devices_per_process=2",
      f"--log_dir={log_dir}", "--",
      *_train_command(kjv_text_dir, workdir),
  ]
  launcher = subprocess.Popen(command, env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
  pids = {}
  while len(pids) < 2:
    line = launcher.stdout.readline()
    assert line, "the launcher exited before starting both processes"
    match = re.match(r"Started process (\d+) \(pid (\d+)\)", line)
    if match:
      pids[int(match.group(1))] = int(match.group(2))

  _wait_for_step(workdir, launcher, PROGRESS_STEPS)
  os.kill(pids[1], signal.SIGTERM)
  return_code = launcher.wait(timeout=EXIT_TIMEOUT_SECONDS)
  launcher_output = launcher.stdout.read()
  logs = [_read(log_dir / f"process_{i}.log") for i in range(2)]
  assert return_code == 0, launcher_output + "".join(l[-3000:] for l in logs)

  stopped = [_stopped_step(log) for log in logs]
  assert stopped[0] == stopped[1]
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == [
      str(stopped[0])]
