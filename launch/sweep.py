"""Run, or print the commands of, a config's sweep: one workdir per entry.

Usage (from the repository root):
  python launch/sweep.py --config=configs/demo.py --workdir_root=workdirs/sweep --run
  python launch/sweep.py --config=configs/demo.py --workdir_root=workdirs/sweep --print
  python launch/sweep.py --config=configs/demo.py:steps=300 \
      --workdir_root=workdirs/sweep --run --only='heads=8,*'

The config module defines `sweep()`, a list of dicts that map dotted config
fields to values, e.g. `{"model.num_lm_heads": 4, "seed": 1}`. Each entry gets
the workdir `WORKDIR_ROOT/<name>`, with the name built from the overrides
(`heads=4,seed=1`).

--run trains and evaluates the entries one after another, each as a
subprocess `python -m fastk_jax.main --config=... --config.x=y` whose output
goes to `<workdir>/main.log` (--launcher=subprocess, the default), or inside
this process (--launcher=inprocess: training and evaluation without the
generation stage). --print writes one such command per line, for a cluster's
job scheduler.

A run whose evaluation JSON (`<workdir>/eval/step_<total_steps>.json`)
exists is finished and skipped, so rerunning the same command resumes the
sweep. An unfinished run resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

# `python launch/sweep.py` puts launch/ on sys.path, not the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

FLAGS = flags.FLAGS

# Short names of common sweep fields in workdir names; other fields use their
# last dotted component.
SHORT_NAMES = {"model.num_lm_heads": "heads", "decode.top_k": "k",
               "total_steps": "steps"}


@dataclasses.dataclass(frozen=True)
class Run:
  """One sweep entry."""
  name: str
  overrides: dict[str, Any]
  workdir: str
  total_steps: int

  @property
  def eval_json(self) -> str:
    """The evaluation file whose presence marks the run as finished."""
    return os.path.join(self.workdir, "eval", f"step_{self.total_steps}.json")

  def finished(self) -> bool:
    return os.path.exists(self.eval_json)


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """Split "configs/demo.py:heads=4" into the path and the argument string."""
  path, has_arg, arg = spec.partition(":")
  return path, (arg if has_arg else None)


def load_config_module(path: str):
  """Import a config file by path.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the module lacks `get_config` or `sweep`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path!r} not found; pass e.g. "
                            "--config=configs/demo.py.")
  module_name = "sweep_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name in ("get_config", "sweep"):
    if not callable(getattr(module, name, None)):
      raise ValueError(
          f"Config file {path!r} has no {name}() function; a sweep needs "
          "get_config(arg) and sweep() returning a list of override dicts.")
  return module


def format_value(value: Any) -> str:
  """Format an override value for a workdir name and a --config.x=y flag."""
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(overrides: dict[str, Any]) -> str:
  """Build a workdir name such as "heads=4,seed=1" from the overrides."""
  last_parts = [field.rsplit(".", 1)[-1] for field in overrides]
  parts = []
  for field, value in overrides.items():
    short = SHORT_NAMES.get(field, field.rsplit(".", 1)[-1])
    if field not in SHORT_NAMES and last_parts.count(short) > 1:
      short = field  # Two fields share the last component: keep the path.
    parts.append(f"{short}={format_value(value)}")
  name = ",".join(parts) or "default"
  return name.replace(os.sep, "_").replace(" ", "_")


def make_config(module, arg: str | None, overrides: dict[str, Any]):
  """Return `module.get_config(arg)` with the overrides applied, locked.

  Raises:
    ValueError: an override names a field the config does not have.
  """
  config = module.get_config(arg)
  with config.unlocked():
    for field, value in overrides.items():
      *parents, leaf = field.split(".")
      section = config
      try:
        for parent in parents:
          section = section[parent]
        if leaf not in section:
          raise KeyError(leaf)
      except KeyError as err:
        raise ValueError(
            f"Sweep override {field!r} is not a field of the config; check "
            "the spelling in the config's sweep().") from err
      section[leaf] = value
  config.lock()
  return config


def plan_runs(config_spec: str, workdir_root: str,
              only: Sequence[str] = ()) -> list[Run]:
  """List the sweep's runs, keeping those whose name matches a pattern.

  Args:
    config_spec: "path/to/config.py" or "path/to/config.py:arg".
    workdir_root: parent directory of the runs' workdirs.
    only: fnmatch patterns on run names; empty keeps every run.

  Raises:
    ValueError: for duplicate run names or a sweep without entries.
  """
  path, arg = split_config_spec(config_spec)
  module = load_config_module(path)
  entries = list(module.sweep())
  if not entries:
    raise ValueError(f"{path}: sweep() returned no entries.")
  runs, seen = [], set()
  for overrides in entries:
    name = run_name(overrides)
    if name in seen:
      raise ValueError(f"{path}: two sweep entries share the name {name!r}.")
    seen.add(name)
    if only and not any(fnmatch.fnmatchcase(name, p) for p in only):
      continue
    config = make_config(module, arg, overrides)
    runs.append(Run(name=name, overrides=dict(overrides),
                    workdir=os.path.join(workdir_root, name),
                    total_steps=int(config.total_steps)))
  return runs


def main_command(config_spec: str, run: Run, python: str = "python") -> list[str]:
  """Return the `fastk_jax.main` command line of one run."""
  command = [python, "-m", "fastk_jax.main", f"--config={config_spec}",
             f"--workdir={run.workdir}"]
  command += [f"--config.{field}={format_value(value)}"
              for field, value in run.overrides.items()]
  return command


def run_subprocess(config_spec: str, run: Run) -> int:
  """Run one entry as a subprocess; return its exit status.

  Paths become absolute, so the command works from the repository root
  whatever the caller's directory. Output is appended to `<workdir>/main.log`.
  NOTE: the tests run sweeps in-process and do not cover this path.
  """
  path, arg = split_config_spec(config_spec)
  spec = os.path.abspath(path) + ("" if arg is None else f":{arg}")
  absolute = dataclasses.replace(run, workdir=os.path.abspath(run.workdir))
  command = main_command(spec, absolute, python=sys.executable)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  os.makedirs(absolute.workdir, exist_ok=True)
  log_path = os.path.join(absolute.workdir, "main.log")
  logging.info("Running %s: %s (log %s).", run.name, shlex.join(command),
               log_path)
  with open(log_path, "a") as log:
    return subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT, check=False).returncode


def run_in_process(config_spec: str, run: Run) -> None:
  """Train and evaluate one entry inside this process (no generation)."""
  # Imported here so that --print works without loading JAX.
  from fastk_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from fastk_jax import evaluate
  from fastk_jax import train

  path, arg = split_config_spec(config_spec)
  config = make_config(load_config_module(path), arg, run.overrides)
  train.train_and_evaluate(config, run.workdir)
  state = checkpointing.load_inference_state(run.workdir)
  results = evaluate.evaluate_state(state)
  evaluate.write_results(run.workdir, results)
  logging.info("%s: perplexity %.2f, oracle perplexity %.2f, Fast-K "
               "perplexity %.2f.", run.name, results["perplexity"],
               results["oracle_perplexity"], results["fastk_perplexity"])


def run_sweep(config_spec: str, workdir_root: str, *,
              launcher: str = "subprocess",
              only: Sequence[str] = ()) -> dict[str, list[str]]:
  """Run every unfinished entry in order; one failure does not stop the rest.

  Returns:
    Run names by outcome: "finished", "skipped" and "failed".
  """
  if launcher not in ("subprocess", "inprocess"):
    raise ValueError(f"Invalid launcher {launcher!r}: use subprocess or inprocess.")
  runs = plan_runs(config_spec, workdir_root, only)
  outcome = {"finished": [], "skipped": [], "failed": []}
  for index, run in enumerate(runs):
    if run.finished():
      logging.info("Skipping %s: %s exists.", run.name, run.eval_json)
      outcome["skipped"].append(run.name)
      continue
    logging.info("Starting run %d of %d: %s.", index + 1, len(runs), run.name)
    start = time.time()
    try:
      if launcher == "subprocess":
        status = run_subprocess(config_spec, run)
        if status != 0:
          raise RuntimeError(f"exit status {status}; see "
                             f"{os.path.join(run.workdir, 'main.log')}")
      else:
        run_in_process(config_spec, run)
      if not run.finished():
        raise RuntimeError(f"the run ended without writing {run.eval_json}")
    except Exception as err:  # pylint: disable=broad-except
      # One bad run should not cost the rest of a long sweep; it is logged
      # and reported at the end.
      logging.exception("Run %s failed: %s", run.name, err)
      outcome["failed"].append(run.name)
      continue
    logging.info("Finished %s in %.1f minutes.", run.name,
                 (time.time() - start) / 60)
    outcome["finished"].append(run.name)
  logging.info("Sweep done: %d finished, %d skipped (already finished), %d "
               "failed%s.", len(outcome["finished"]), len(outcome["skipped"]),
               len(outcome["failed"]),
               f" ({', '.join(outcome['failed'])})" if outcome["failed"] else "")
  return outcome


def sweep_commands(config_spec: str, workdir_root: str,
                   only: Sequence[str] = ()) -> list[str]:
  """Return the shell commands of the unfinished runs, one per line."""
  commands = []
  for run in plan_runs(config_spec, workdir_root, only):
    if run.finished():
      logging.info("Skipping %s: %s exists.", run.name, run.eval_json)
      continue
    commands.append(shlex.join(main_command(config_spec, run)))
  return commands


def define_flags() -> None:
  """Define the command-line flags (only when run as a program)."""
  flags.DEFINE_string(
      "config", None,
      "Config file with get_config() and sweep(), optionally with an argument "
      "string: configs/demo.py or configs/demo.py:steps=300.")
  flags.DEFINE_string("workdir_root", None,
                      "Directory that gets one workdir per sweep entry.")
  flags.DEFINE_bool("run", False, "Run the unfinished entries one by one.")
  flags.DEFINE_bool("print", False,
                    "Print the command of each unfinished entry instead.")
  flags.DEFINE_enum(
      "launcher", "subprocess", ["subprocess", "inprocess"],
      "With --run: one `python -m fastk_jax.main` subprocess per entry, or "
      "training and evaluation inside this process.")
  flags.DEFINE_multi_string(
      "only", [],
      "Keep only runs whose name matches this fnmatch pattern, e.g. "
      "'heads=8,*'; repeat the flag for several patterns.")
  flags.mark_flags_as_required(["config", "workdir_root"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.run == FLAGS.print:
    raise app.UsageError("Pass exactly one of --run and --print.")
  if FLAGS.print:
    for command in sweep_commands(FLAGS.config, FLAGS.workdir_root, FLAGS.only):
      print(command)
    return 0
  from fastk_jax import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_library_logs()
  outcome = run_sweep(FLAGS.config, FLAGS.workdir_root,
                      launcher=FLAGS.launcher, only=FLAGS.only)
  return 1 if outcome["failed"] else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
