"""launch/sweep.py: run names, overrides, a real two-run sweep, printed mode."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location(
    "launch_sweep", os.path.join(ROOT, "launch", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
sys.modules["launch_sweep"] = sweep  # dataclasses look the module up.
_spec.loader.exec_module(sweep)

# A config file with a sweep() beside get_config(), wrapping configs/tiny.py.
SWEEP_CONFIG = """
import importlib.util

_spec = importlib.util.spec_from_file_location("tiny_for_sweep", {tiny!r})
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config(arg=None):
  return _tiny.get_config(arg)


def sweep():
  return [{{"model.num_lm_heads": 1, "seed": 0}},
          {{"model.num_lm_heads": 2, "seed": 1}}]
"""


@pytest.fixture
def config_spec(tmp_path, kjv_text_dir):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(SWEEP_CONFIG.format(
      tiny=os.path.join(ROOT, "configs", "tiny.py")))
  return f"{path}:text_dir={kjv_text_dir}"


def test_run_name_from_overrides():
  assert sweep.run_name({"model.num_lm_heads": 4, "seed": 1}) == "heads=4,seed=1"
  assert sweep.run_name({"loss.wta_epsilon": 0.05}) == "wta_epsilon=0.05"
  # Fields with the same last component keep their full path.
  assert sweep.run_name({"model.dropout": 0.1, "data.dropout": 0.2}) == (
      "model.dropout=0.1,data.dropout=0.2")
  assert sweep.run_name({}) == "default"


def test_unknown_override_fails(config_spec):
  path, arg = sweep.split_config_spec(config_spec)
  module = sweep.load_config_module(path)
  with pytest.raises(ValueError, match="'model.num_heads_typo'"):
    sweep.make_config(module, arg, {"model.num_heads_typo": 2})
  config = sweep.make_config(module, arg, {"model.num_lm_heads": 3})
  assert config.model.num_lm_heads == 3
  with pytest.raises(AttributeError):
    config.new_field = 1  # Still locked.


def test_config_without_sweep_fails():
  with pytest.raises(ValueError, match="no sweep"):
    sweep.load_config_module(os.path.join(ROOT, "configs", "tiny.py"))


def test_sweep_runs_resumes_and_prints(config_spec, tmp_path):
  root = str(tmp_path / "sweep")
  runs = sweep.plan_runs(config_spec, root)
  assert [r.name for r in runs] == ["heads=1,seed=0", "heads=2,seed=1"]

  # Two real runs, in this process.
  outcome = sweep.run_sweep(config_spec, root, launcher="inprocess")
  assert outcome == {"finished": ["heads=1,seed=0", "heads=2,seed=1"],
                     "skipped": [], "failed": []}
  for run, heads, seed in zip(runs, (1, 2), (0, 1)):
    with open(run.eval_json) as f:
      results = json.load(f)
    assert results["num_lm_heads"] == heads
    assert results["step"] == run.total_steps == 6
    with open(os.path.join(run.workdir, "config.json")) as f:
      assert json.load(f)["seed"] == seed

  # A second call finds both evaluation files and skips the runs.
  outcome = sweep.run_sweep(config_spec, root, launcher="inprocess")
  assert outcome["skipped"] == ["heads=1,seed=0", "heads=2,seed=1"]
  assert outcome["finished"] == []
  assert sweep.sweep_commands(config_spec, root) == []

  # Printed mode on a new root: one main command per unfinished run.
  commands = sweep.sweep_commands(config_spec, str(tmp_path / "new"),
                                  only=["heads=2,*"])
  assert len(commands) == 1
  command = shlex.split(commands[0])
  assert command[:3] == ["python", "-m", "fastk_jax.main"]
  assert f"--config={config_spec}" in command
  assert f"--workdir={tmp_path / 'new' / 'heads=2,seed=1'}" in command
  assert "--config.model.num_lm_heads=2" in command
  assert "--config.seed=1" in command


def test_print_command_line(config_spec, tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "sweep.py"),
       f"--config={config_spec}", f"--workdir_root={tmp_path / 'cli'}",
       "--print"],
      capture_output=True, text=True, check=True, cwd=str(tmp_path))
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  assert all("-m fastk_jax.main" in line for line in lines)
  assert "--config.model.num_lm_heads=1" in lines[0]

  # Exactly one of --run and --print.
  both = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "sweep.py"),
       f"--config={config_spec}", f"--workdir_root={tmp_path / 'cli'}",
       "--print", "--run"], capture_output=True, text=True, cwd=str(tmp_path))
  assert both.returncode != 0
  assert "exactly one of --run and --print" in both.stderr
