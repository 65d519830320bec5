"""Running a local service (a JVM, a server) as a subprocess: the one home for it.

Tests, benchmarks and `python -m beam_dl.services.kafka` start real services
(Kafka, an MLflow server, an HDFS mini-cluster, Beam's job servers) on
127.0.0.1. Each runs in its own process group, is polled ready with a
deadline (a service that exits or never answers raises `ServiceError` with
the tail of its log) and has its whole group terminated, then killed, when
the block exits, so no JVM or worker outlives a test.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Callable, Iterator, Mapping, Optional, Sequence


class ServiceError(RuntimeError):
  """A service that could not start: it exited, or never became ready in time."""


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def port_open(port: int, host: str = '127.0.0.1') -> bool:
  """True once something accepts connections on host:port."""
  try:
    with socket.create_connection((host, port), timeout=1):
      return True
  except OSError:
    return False


def log_tail(path: str, n: int = 3000) -> str:
  """The last n bytes of a log file as text ('' if it can't be read)."""
  try:
    with open(path, 'rb') as f:
      return f.read()[-n:].decode('utf-8', 'replace')
  except OSError:
    return ''


def stop_process_group(process: subprocess.Popen, grace_s: float = 10) -> None:
  """SIGTERM to the process's group, SIGKILL after grace_s; waits for it."""
  if process.poll() is not None:
    return
  with contextlib.suppress(ProcessLookupError):
    os.killpg(process.pid, signal.SIGTERM)
  try:
    process.wait(grace_s)
  except subprocess.TimeoutExpired:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait(grace_s)


def wait_ready(process: subprocess.Popen, ready: Callable[[], bool], timeout_s: float, log_path: str,
               poll_s: float = 0.2) -> None:
  """Returns once ready() is true; ServiceError if the process exits first or
  the deadline passes (with the log's tail)."""
  name = os.path.basename(str(process.args[0] if isinstance(process.args, (list, tuple)) else process.args))
  deadline = time.monotonic() + timeout_s
  while not ready():
    if process.poll() is not None:
      raise ServiceError(f'{name} exited with {process.returncode}:\n{log_tail(log_path)}')
    if time.monotonic() > deadline:
      raise ServiceError(f'{name} not ready after {timeout_s:g} s:\n{log_tail(log_path)}')
    time.sleep(poll_s)


@contextlib.contextmanager
def service_process(
    command: Sequence[str],
    *,
    log_path: str,
    ready: Callable[[], bool],
    timeout_s: float,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    grace_s: float = 10,
) -> Iterator[subprocess.Popen]:
  """Runs `command` (output appended to log_path) in its own process group,
  yields the Popen once ready() holds, and stops the group on exit."""
  with open(log_path, 'ab') as log:
    process = subprocess.Popen(list(command), cwd=cwd, env=None if env is None else dict(env), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
  try:
    wait_ready(process, ready, timeout_s, log_path)
    yield process
  finally:
    stop_process_group(process, grace_s)


def serve_until_stopped() -> None:
  """Blocks until SIGINT or SIGTERM: what a service's `python -m` entry does
  after printing its address, so the `with` block around it tears it down."""
  try:
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
  except KeyboardInterrupt:
    pass
