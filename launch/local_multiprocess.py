"""Start N JAX processes on this machine, as a multi-host job would run.

  python launch/local_multiprocess.py --num_processes=2 \
      --cpu_devices_per_process=4 -- \
      python -m fastk_jax.train --config=configs/tiny.py --workdir=/tmp/run

Each process runs the command after `--` with the flags
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`
appended, which `fastk_jax.distributed.initialize` reads. The coordinator
port is a free local port unless `--port` sets one. With
`--cpu_devices_per_process`, every process runs on the CPU with that many
devices (JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES), so multi-host code can be
tested without accelerators; cross-process collectives then use gloo, JAX's
default CPU collectives.

SIGTERM and SIGINT sent to this launcher are forwarded to every process. If
one process fails, the others are terminated, because they would otherwise
wait for it in the next collective until a timeout. The exit code is 0 when
every process exits with 0, else the first non-zero code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

# Seconds the other processes get to exit after SIGTERM, once one failed.
_TERMINATE_GRACE_SECONDS = 30


def free_port() -> int:
  """Return a TCP port on 127.0.0.1 that is free at the time of the call."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_command(command: list[str], port: int, num_processes: int,
                    process_id: int) -> list[str]:
  """Return `command` with the explicit jax.distributed flags appended."""
  return command + [
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={process_id}",
  ]


def process_env(cpu_devices: int | None) -> dict[str, str]:
  env = dict(os.environ)
  if cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
  return env


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s [options] -- COMMAND [ARGS...]")
  parser.add_argument("--num_processes", type=int, default=2,
                      help="Number of processes to start (default 2).")
  parser.add_argument("--cpu_devices_per_process", type=int, default=None,
                      help="Run each process on the CPU with this many "
                      "devices. Unset: JAX's default platform and devices.")
  parser.add_argument("--port", type=int, default=None,
                      help="Coordinator port on 127.0.0.1 (default: a free "
                      "one).")
  parser.add_argument("--log_dir", default=None,
                      help="Write process I's stdout and stderr to "
                      "LOG_DIR/process_I.log instead of this terminal.")
  if "--" not in argv:
    parser.error("put the command to run after `--`.")
  split = argv.index("--")
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if not args.command:
    parser.error("the command after `--` is empty.")
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes} must be at least 1.")
  return args


def launch(args: argparse.Namespace) -> int:
  """Start the processes, wait for all of them and return the exit code."""
  port = args.port or free_port()
  env = process_env(args.cpu_devices_per_process)
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)

  processes, log_files = [], []
  for process_id in range(args.num_processes):
    output = None
    if args.log_dir:
      path = os.path.join(args.log_dir, f"process_{process_id}.log")
      output = open(path, "w")
      log_files.append(output)
    command = process_command(args.command, port, args.num_processes,
                              process_id)
    stderr = subprocess.STDOUT if output else None
    processes.append(subprocess.Popen(command, env=env, stdout=output,
                                      stderr=stderr))
    print(f"Started process {process_id} (pid {processes[-1].pid}): "
          f"{' '.join(command)}", flush=True)

  def forward(signum, frame):
    del frame
    for process in processes:
      if process.poll() is None:
        process.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  exit_code = 0
  failed_at = None
  while any(p.poll() is None for p in processes):
    for process_id, process in enumerate(processes):
      code = process.poll()
      if code and failed_at is None:
        print(f"Process {process_id} exited with code {code}; terminating the "
              "others.", file=sys.stderr, flush=True)
        exit_code, failed_at = code, time.monotonic()
        forward(signal.SIGTERM, None)
    if failed_at and time.monotonic() - failed_at > _TERMINATE_GRACE_SECONDS:
      forward(signal.SIGKILL, None)
    time.sleep(0.2)

  for process_id, process in enumerate(processes):
    if process.returncode and not exit_code:
      exit_code = process.returncode
    print(f"Process {process_id} exited with code {process.returncode}.",
          flush=True)
  for output in log_files:
    output.close()
  return exit_code


if __name__ == "__main__":
  sys.exit(launch(parse_args(sys.argv[1:])))
