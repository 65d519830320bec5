"""Runs a JAX program as N processes on this machine, as a cluster would.

Each process gets the environment `sharding.maybe_initialize_distributed`
reads (JAX_COORDINATOR_ADDRESS on a free 127.0.0.1 port, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). The launcher owns them: they share one process group,
SIGINT or SIGTERM to the launcher stops them all, and when one exits with
an error the others get `grace_s` seconds to end on their own (JAX's
heartbeat timeout ends them) before the group is terminated, so no process
outlives the launch. The exit code is 0 only if every process succeeded.

    python -m beam_dl.training.launch --processes 2 -- python my_jax_script.py ARGS

(`pipelines.train --processes N` launches itself this way.)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Mapping, Sequence

from beam_dl.services.process import free_port

log = logging.getLogger(__name__)


def process_env(index: int, count: int, coordinator: str, base: Mapping[str, str] | None = None) -> dict:
  """The environment of process `index` of `count`."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index))
  return env


def _describe(code: int) -> str:
  return f'signal {signal.Signals(-code).name}' if code < 0 else f'exit code {code}'


def _stop(group: int, procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to the group, SIGKILL to what is left after grace_s."""
  with contextlib.suppress(ProcessLookupError):
    os.killpg(group, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    with contextlib.suppress(subprocess.TimeoutExpired):
      p.wait(max(deadline - time.monotonic(), 0))
  with contextlib.suppress(ProcessLookupError):
    os.killpg(group, signal.SIGKILL)
  for p in procs:
    p.wait()


def launch_local(
  command: Sequence[str], num_processes: int, *, grace_s: float = 15, env: Mapping[str, str] | None = None
) -> int:
  """Runs `command` as `num_processes` JAX processes; returns the exit code.

  Their output goes to this process's stdout/stderr (each log line names its
  process). Returns 0 when all exit 0; otherwise, after stopping the rest,
  the exit code of the first process that failed (1 if a signal ended it);
  128 + the signal when SIGINT or SIGTERM stopped the launch.
  """
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {num_processes}')
  coordinator = f'127.0.0.1:{free_port()}'
  procs: list[subprocess.Popen] = []
  stopping: list[int] = []

  def on_signal(signum, _frame):
    stopping.append(signum)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(num_processes):
      procs.append(
        subprocess.Popen(
          list(command),
          env=process_env(i, num_processes, coordinator, env),
          process_group=0 if not procs else procs[0].pid,
        )
      )
      log.info('process %d of %d: pid %d', i, num_processes, procs[-1].pid)
    group = procs[0].pid
    failed_at, first_failure = None, None
    while True:
      codes = [p.poll() for p in procs]
      if stopping:
        log.error('launcher got %s: stopping all %d processes', signal.Signals(stopping[0]).name, num_processes)
        _stop(group, procs, grace_s)
        return 128 + stopping[0]
      if all(c == 0 for c in codes):
        return 0
      bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if bad and failed_at is None:
        failed_at, first_failure = time.monotonic(), bad[0][1]
        log.error('process %d failed (%s); the others get %.0fs to end', bad[0][0], _describe(bad[0][1]), grace_s)
      if failed_at is not None and (all(c is not None for c in codes) or time.monotonic() - failed_at > grace_s):
        _stop(group, procs, grace_s)
        log.error('run failed: %s', ', '.join(f'process {i}: {_describe(p.returncode)}' for i, p in enumerate(procs)))
        return first_failure if first_failure > 0 else 1
      time.sleep(0.2)
  except BaseException:
    if procs:
      _stop(procs[0].pid, procs, grace_s)
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def main_module_command(module: str, argv: Sequence[str]) -> list[str]:
  """`python -m module argv` with this interpreter."""
  return [sys.executable, '-m', module, *argv]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m beam_dl.training.launch', description='Runs COMMAND as N JAX processes on this machine.'
  )
  parser.add_argument('--processes', type=int, required=True, metavar='N')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- COMMAND ARGS...')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command or args.processes < 1:
    parser.error('needs --processes N >= 1 and a COMMAND after --')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  return launch_local(command, args.processes)


if __name__ == '__main__':
  sys.exit(main())
