"""Running a local service (a JVM, a server) as a subprocess: the one home for it.

Tests, benchmarks and `python -m beam_dl.services.kafka` start real services
(Kafka, an MLflow server, an HDFS mini-cluster, Beam's job servers) on
127.0.0.1. Each runs in its own process group, is polled ready with a
deadline (a service that exits or never answers raises `ServiceError` with
the tail of its log) and has its whole group terminated, then killed, when
the block exits, so no JVM or worker outlives a test. A `python -m` entry
runs inside `stopped_by_signals()`: SIGTERM (`kill`, a supervisor) then
unwinds its `with` blocks exactly as Ctrl-C does, so the JVMs it started in
their own groups stop with it instead of outliving it.
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


def wait_ready(
  process: subprocess.Popen, ready: Callable[[], bool], timeout_s: float, log_path: str, poll_s: float = 0.2
) -> None:
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
    process = subprocess.Popen(
      list(command),
      cwd=cwd,
      env=None if env is None else dict(env),
      stdout=log,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      start_new_session=True,
    )
  try:
    wait_ready(process, ready, timeout_s, log_path)
    yield process
  finally:
    stop_process_group(process, grace_s)


class Stopped(KeyboardInterrupt):
  """Raised in the main thread by SIGTERM inside `stopped_by_signals()`."""


def _raise_stopped(signum, frame):  # pylint: disable=unused-argument
  # Cleanup must not be cut short by a second signal: ignore both from now on.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
  """Runs the block until it ends or SIGINT/SIGTERM arrives (at start-up too);
  either signal raises in the main thread, so every `with` block inside stops
  what it started, and the block then returns quietly. Main thread only."""
  previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  except KeyboardInterrupt:
    pass
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def serve_until_stopped() -> None:
  """Blocks until a signal ends the process's `stopped_by_signals()` block:
  what a service's `python -m` entry does after printing its address."""
  while True:
    signal.pause()


# A process a cluster member starts may leave the member's process group (Beam's
# Python boot binary puts each SDK worker in a group of its own) and outlive the
# member when it is killed with SIGKILL. Members are therefore started with an
# environment variable naming them; every descendant inherits it, so a
# member's leftovers can be found and ended whatever group they are in.
MEMBER_ENV = 'BEAM_DL_SERVICE_MEMBER'


def processes_tagged(prefix: str) -> list[int]:
  """Pids of this user's processes whose MEMBER_ENV value starts with prefix (Linux /proc)."""
  needle = f'{MEMBER_ENV}={prefix}'.encode()
  pids = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit() or int(entry) == os.getpid():
      continue
    try:
      with open(f'/proc/{entry}/environ', 'rb') as f:
        variables = f.read().split(b'\0')
    except OSError:  # gone, or another user's
      continue
    if any(v.startswith(needle) for v in variables):
      pids.append(int(entry))
  return pids


def kill_tagged(prefix: str, grace_s: float = 5) -> list[int]:
  """SIGTERM to every process tagged with prefix, SIGKILL to any left after
  grace_s; returns the pids it signalled."""
  pids = processes_tagged(prefix)
  for pid in pids:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and processes_tagged(prefix):
    time.sleep(0.1)
  for pid in processes_tagged(prefix):
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)
  return pids


# /proc/net/tcp{,6} state 0A is LISTEN; addresses are hex, 32-bit words in host byte order (Linux, little-endian).
_TCP_LISTEN = '0A'


def _address(hex_address: str) -> str:
  """'0100007F' -> '127.0.0.1'; a 32-hex-digit IPv6 address -> its usual text form."""
  raw = bytes.fromhex(hex_address)
  family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
  words = b''.join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
  return socket.inet_ntop(family, words)


def _socket_inodes(pid: int) -> set[str]:
  inodes = set()
  try:
    fds = os.listdir(f'/proc/{pid}/fd')
  except OSError:  # gone, or another user's
    return inodes
  for fd in fds:
    with contextlib.suppress(OSError):
      target = os.readlink(f'/proc/{pid}/fd/{fd}')
      if target.startswith('socket:['):
        inodes.add(target[8:-1])
  return inodes


def listening_sockets(pids: Sequence[int]) -> list[tuple[int, str, int]]:
  """(pid, address, port) of every TCP socket the processes `pids` listen on (Linux /proc)."""
  owners = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
  found = []
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    with open(table, encoding='ascii') as f:
      next(f)
      for line in f:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == _TCP_LISTEN and inode in owners:
          address, port = local.split(':')
          found.append((owners[inode], _address(address), int(port, 16)))
  return sorted(found)


def is_loopback(address: str) -> bool:
  """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.x.y.z)."""
  import ipaddress  # pylint: disable=g-import-not-at-top

  ip = ipaddress.ip_address(address)
  return ip.is_loopback or bool(getattr(ip, 'ipv4_mapped', None) and ip.ipv4_mapped.is_loopback)
