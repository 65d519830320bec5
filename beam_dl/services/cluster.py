"""The processes of a local cluster (Flink, Spark): one group, supervised, stopped together.

A cluster is a coordinator (Flink's JobManager, Spark's Master), members
(TaskManagers, Workers) and Beam's job server, each a JVM. `ClusterProcesses`
starts them all in ONE process group (the coordinator's), so the group is
the cluster, and tags each with `MEMBER_ENV` (`<cluster>/<member>/<generation>`)
so that what a member starts and then leaves behind (the Python SDK workers
Beam's boot binary runs in process groups of their own) is found and ended
with it. A supervisor thread restarts a member that exits, as Kubernetes or
YARN would, after ending its leftovers; `stop()` ends the group, then every
tagged process. `LocalCluster` is the context manager around them; the
commands and readiness checks belong to each cluster's own module
(flink_cluster.py, spark_cluster.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Callable, Mapping, Optional, Sequence

from beam_dl.services.process import (
  MEMBER_ENV,
  ServiceError,
  kill_tagged,
  listening_sockets,
  log_tail,
  processes_tagged,
  serve_until_stopped,
  stopped_by_signals,
)

log = logging.getLogger(__name__)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNERS_DIR = os.environ.get('BEAM_DL_RUNNERS_DIR', os.path.join(ROOT, '.runners'))


def job_server_lib(runner: str) -> str | None:
  """A Beam job server's classpath folder from `make runners` (`flink`, `spark`;
  BEAM_DL_FLINK_LIB / BEAM_DL_SPARK_LIB override)."""
  override = os.environ.get(f'BEAM_DL_{runner.upper()}_LIB')
  if override:
    return override
  found = sorted(glob.glob(os.path.join(RUNNERS_DIR, f'beam-runners-{runner}-*-job-server-*-lib')))
  return found[-1] if found else None


def python_boot() -> str:
  """Beam's Python SDK boot binary (`make boot`); BEAM_DL_PYTHON_BOOT overrides."""
  return os.environ.get('BEAM_DL_PYTHON_BOOT') or os.path.join(RUNNERS_DIR, 'python_boot')


# How long a job keeps an idle Python worker for its next task (Beam's --environment_cache_millis).
# Beam's default, 0, ends the worker with each task: a TaskManager or executor then starts a new
# Python process (3-7 s of imports) for every task of every stage. But Beam never checks that a
# kept worker is alive: a task rerun after its worker died gets the dead worker again, and fails,
# for as long as the job keeps it. So the Flink cluster's restart delay is longer than this, and
# the worker is gone before the rerun (docs/clusters.md).
WORKER_REUSE_MS = 3000


def process_worker_flags() -> list[str]:
  """The flags that run a job's Python workers as processes of the cluster's TaskManagers or
  executors, through Beam's boot binary, each kept for the job's next task."""
  return [
    '--environment_type=PROCESS',
    f'--environment_config={json.dumps({"command": python_boot()})}',
    f'--environment_cache_millis={WORKER_REUSE_MS}',
  ]


NO_JARS_TO_STAGE = 'beam_dl.runners.NoJarsToStage'  # third_party/beam-runners/staging


def staging_jar(lib: str) -> list[str]:
  """The jar of NoJarsToStage in the job server's classpath `lib` (`make runners`), or none."""
  return glob.glob(os.path.join(lib, 'job-server-staging-*.jar'))


def staging_flags(lib: str) -> list[str]:
  """The flag that stages no jars with each job, when the job server's classpath `lib` has
  NoJarsToStage (`make runners`). Beam otherwise ships the job server's whole classpath (~160
  jars, ~150 MB) with every job; this cluster's JVMs already run on that same classpath."""
  if staging_jar(lib):
    return [f'--pipeline_resources_detector_factory_class={NO_JARS_TO_STAGE}']
  return []


def missing(runner: str, marker_jar: str) -> str | None:
  """None when a cluster of `runner` can start here (its job server classpath
  holds `marker_jar`, the boot binary and java exist), else what to run."""
  lib = job_server_lib(runner)
  if not lib or not glob.glob(os.path.join(lib, marker_jar)):
    return f'no {runner.capitalize()} job server classpath in {RUNNERS_DIR}: run `make runners`'
  if not os.access(python_boot(), os.X_OK):
    return f'no Python boot binary at {python_boot()}: run `make boot`'
  if not shutil.which('java'):
    return 'no `java` on PATH (Java 17)'
  return None


def job_server_ports(log_path: str) -> dict[str, int]:
  """{'JobService', 'ArtifactStagingService', 'Java ExpansionService': port} as a Beam
  job server's log announces them. Beam 2.62's job server binds its job and artifact
  ports on all interfaces whatever `--job-host` says (its gRPC ServerFactory builds
  servers with `forPort`), its expansion port on `--job-host`."""
  with open(log_path, errors='replace') as f:
    return {
      m[1]: int(m[2])
      for m in re.finditer(r'(JobService|ArtifactStagingService|Java ExpansionService) started on \S*:(\d+)', f.read())
    }


def http_json(port: int, path: str, method: str = 'GET', body: dict | None = None) -> dict | None:
  """`method` http://127.0.0.1:port/path (with a JSON body) -> the JSON answer; None
  while it does not answer (or answers an error)."""
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(
    f'http://127.0.0.1:{port}{path}', data=data, method=method, headers={'Content-Type': 'application/json'}
  )
  try:
    with urllib.request.urlopen(request, timeout=10 if method != 'GET' else 3) as r:
      raw = r.read()
    return json.loads(raw) if raw.strip() else {}
  except (OSError, ValueError):
    return None


@dataclasses.dataclass
class Member:
  """One supervised process: how to start it, and its current Popen."""

  name: str
  command: Sequence[str]
  log_path: str
  restart: bool
  cwd: str
  process: Optional[subprocess.Popen] = None
  generation: int = 0
  restarts: int = 0


class ClusterProcesses:
  """Starts, supervises and stops the processes of one cluster."""

  def __init__(self, env: Mapping[str, str], cwd: str, *, poll_s: float = 0.5, grace_s: float = 10):
    self.cluster_id = uuid.uuid4().hex[:12]
    self._env = dict(env)
    self._cwd = cwd
    self._poll_s = poll_s
    self._grace_s = grace_s
    self._members: dict[str, Member] = {}
    self._pgid: Optional[int] = None
    self._lock = threading.Lock()
    self._stopping = threading.Event()
    self._supervisor: Optional[threading.Thread] = None
    self.on_restart: Callable[[str], None] = lambda name: None

  def tag(self, name: str = '') -> str:
    """The MEMBER_ENV prefix of the cluster (name='') or of one member."""
    return f'{self.cluster_id}/{name}/' if name else f'{self.cluster_id}/'

  def start(
    self, name: str, command: Sequence[str], log_path: str, *, restart: bool = False, cwd: Optional[str] = None
  ) -> Member:
    """Starts `command` as member `name` in the cluster's process group
    (the first member's group); restart: the supervisor restarts it when it
    exits; cwd: its working directory (default: the cluster's)."""
    member = Member(name, list(command), log_path, restart, cwd or self._cwd)
    with self._lock:
      self._launch(member)
      self._members[name] = member
    return member

  def _launch(self, member: Member) -> None:
    env = {**self._env, MEMBER_ENV: f'{self.tag(member.name)}{member.generation}'}
    with open(member.log_path, 'ab') as out:
      # A new group in this session (a group of another session cannot be joined).
      group = {'process_group': 0 if self._pgid is None else self._pgid}
      member.process = subprocess.Popen(
        member.command, cwd=member.cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **group
      )
    if self._pgid is None:
      self._pgid = member.process.pid

  def member(self, name: str) -> Member:
    return self._members[name]

  def pids(self, name: str) -> list[int]:
    """Every live process of member `name`: the JVM and what it started."""
    return processes_tagged(self.tag(name))

  def listening(self) -> list[tuple[str, str, int]]:
    """(member, address, port) of every TCP socket the cluster's processes
    listen on: each member's JVM and what it started (executors, SDK workers)."""
    return sorted(
      (name, address, port) for name in list(self._members) for _, address, port in listening_sockets(self.pids(name))
    )

  def check_alive(self, name: str) -> None:
    """ServiceError with the log's tail if member `name` has exited."""
    member = self._members[name]
    if member.process.poll() is not None:
      raise ServiceError(f'{name} exited with {member.process.returncode}:\n{log_tail(member.log_path)}')

  def supervise(self) -> None:
    """Starts the thread that restarts members (restart=True) that exit."""
    self._supervisor = threading.Thread(target=self._watch, name=f'supervise-{self.cluster_id}', daemon=True)
    self._supervisor.start()

  def _watch(self) -> None:
    while not self._stopping.wait(self._poll_s):
      for member in list(self._members.values()):
        if not member.restart or member.process.poll() is None:
          continue
        with self._lock:
          if self._stopping.is_set():
            return
          old = f'{self.tag(member.name)}{member.generation}'
          leftovers = kill_tagged(old, grace_s=2)
          log.warning(
            '%s exited with %s; ended %d of its processes; restarting it',
            member.name,
            member.process.returncode,
            len(leftovers),
          )
          member.generation += 1
          member.restarts += 1
          self._launch(member)
        self.on_restart(member.name)

  def stop(self) -> None:
    """Stops supervising; SIGTERM to the group, SIGKILL after grace_s; then
    ends every process still tagged with the cluster (SDK workers included)."""
    self._stopping.set()
    if self._supervisor is not None:
      self._supervisor.join(10)
    with self._lock:
      if self._pgid is not None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(self._pgid, signal.SIGTERM)
      deadline = time.monotonic() + self._grace_s
      for member in self._members.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
          member.process.wait(max(0.1, deadline - time.monotonic()))
      if self._pgid is not None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(self._pgid, signal.SIGKILL)
      for member in self._members.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
          member.process.wait(5)
      kill_tagged(self.tag(), grace_s=2)


class LocalCluster:
  """What the Flink and Spark clusters share: start (stopping what started
  if any step fails), wait for readiness with the members' logs on failure,
  stop, and the context-manager protocol. Subclasses write `_start()`."""

  name = 'cluster'

  def __init__(self, workdir: Optional[str], env: Mapping[str, str], start_timeout_s: float):
    self._own_dir = workdir is None
    self.workdir = workdir or tempfile.mkdtemp(prefix=f'{self.name.lower()}_cluster_')
    self._timeout = start_timeout_s
    self.processes = ClusterProcesses(env, cwd=self.workdir)
    self.started_s: Optional[float] = None

  def _start(self) -> None:
    raise NotImplementedError

  def start(self):
    start = time.monotonic()
    try:
      self._start()
    except BaseException:
      self.stop()
      raise
    self.started_s = time.monotonic() - start
    return self

  def log_path(self, member: str) -> str:
    return os.path.join(self.workdir, f'{member}.log')

  def wait_until(self, ready: Callable[[], bool], members: Sequence[str]) -> None:
    """Returns once ready(); ServiceError with the logs' tails if a member exits or time runs out."""
    deadline = time.monotonic() + self._timeout
    while not ready():
      for member in members:
        self.processes.check_alive(member)
      if time.monotonic() > deadline:
        tails = '\n'.join(f'--- {m}\n{log_tail(self.log_path(m), 1500)}' for m in members)
        raise ServiceError(f'{self.name} cluster not ready after {self._timeout:g} s:\n{tails}')
      time.sleep(0.3)

  def stop(self) -> None:
    """Stops every process of the cluster (SDK workers included); removes its own workdir."""
    self.processes.stop()
    if self._own_dir:
      shutil.rmtree(self.workdir, ignore_errors=True)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def kill_member(cluster: LocalCluster, name: str) -> int:
  """SIGKILL to one member's JVM only (as the kernel or a preemption would);
  returns its pid. The supervisor ends what it started and restarts it."""
  process = cluster.processes.member(name).process
  process.kill()
  return process.pid


def command_line(module: str, description: str, workdir_help: str) -> argparse.ArgumentParser:
  """The flags every cluster service takes (`--bind_host`, `--workdir`)."""
  parser = argparse.ArgumentParser(prog=f'python -m {module}', description=description)
  parser.add_argument(
    '--bind_host',
    default='127.0.0.1',
    help='address the JVMs listen on (0.0.0.0 opens the cluster beyond this machine)',
  )
  parser.add_argument('--workdir', help=f'{workdir_help} (default: a temp dir removed on exit)')
  return parser


def refuse_unless(parser: argparse.ArgumentParser, problems: Sequence[Optional[str]]) -> None:
  """Exit 2 with one line for the first problem found (None: no problem)."""
  for problem in problems:
    if problem:
      parser.exit(2, f'{parser.prog}: error: {problem}\n')


def serve(cluster: LocalCluster, shape: str) -> int:
  """A service's `python -m` entry: start `cluster`, print the runner flags on
  one line (and the flags of the sources it serves, if any, on a second),
  run until SIGINT/SIGTERM (also while it starts), stop everything."""
  with stopped_by_signals(), cluster:
    logging.info('%s up in %.1f s: %s, logs in %s', type(cluster).__name__, cluster.started_s, shape, cluster.workdir)
    for flags in (cluster.runner_flags, getattr(cluster, 'source_flags', [])):
      if flags:
        print(' '.join(shlex.quote(f) for f in flags), flush=True)
    serve_until_stopped()
  return 0
