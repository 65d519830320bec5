"""A Flink 1.19 session cluster on this machine, with Beam's job server and Python workers it owns.

    make runners boot                                    # once: .runners/ (job server, -lib/, boot binary)
    python -m beam_dl.services.flink_cluster --taskmanagers 2 --slots 1
    # prints one line of runner flags, runs until Ctrl-C or SIGTERM:
    # --runner=FlinkRunner --flink_master=127.0.0.1:P --job_endpoint=localhost:J --parallelism=2
    #   --environment_type=PROCESS --environment_config={"command": ".../.runners/python_boot"}
    #   --environment_cache_millis=3000

    python -m beam_dl.services.flink_cluster --kafka_io  # + Beam's KafkaIO (make kafka-io), and
    # a second line: --kafka_reader=xlang --kafka_expansion_service=localhost:E

    with FlinkCluster(taskmanagers=2) as cluster:        # tests and benchmarks
      ... cluster.runner_flags ...
      cluster.kill_taskmanager(0)                        # kill -9; the cluster restarts it

A JobManager (`StandaloneSessionClusterEntrypoint`), TaskManagers
(`TaskManagerRunner`) and Beam's Flink job server (`FlinkJobServerDriver`,
pointed at the JobManager) run as separate JVMs on the job server's own
`-lib/` classpath, which bundles Flink's runtime: nothing else to fetch.
The JVM flags and `-D` memory properties are the ones Flink's own scripts
compute (`BashJavaUtils GET_JM_RESOURCE_PARAMS / GET_TM_RESOURCE_PARAMS`).
Config lives in a temp dir; every port is free and bound to 127.0.0.1
unless `bind_host` says otherwise, but those Beam 2.62's job server and Fn
API servers bind on all interfaces whatever they are told (docs/clusters.md,
Ports).

Python SDK workers run as PROCESS environments: each TaskManager starts
Beam's Python boot binary (built by `make boot` with Go), which runs
`sdk_worker_main` with this interpreter (the cluster's PATH starts with its
bin/). A TaskManager killed with SIGKILL leaves its boot process and workers
behind; the supervisor (`ClusterProcesses`) ends them and starts a new
TaskManager, and Flink restarts the job from its last checkpoint (batch:
the failed region) under a fixed-delay restart strategy. Jobs spread over
every TaskManager (`cluster.evenly-spread-out-slots`). Checkpoints and
savepoints are files under the work dir; `stop_with_savepoint` stops a
streaming job the way `flink stop` does, for a restart with
`--savepoint_path`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from beam_dl.services import kafka_io
from beam_dl.services.cluster import (
  WORKER_REUSE_MS,
  LocalCluster,
  command_line,
  http_json,
  job_server_lib,
  kill_member,
  missing,
  process_worker_flags,
  refuse_unless,
  serve,
  staging_flags,
  staging_jar,
)
from beam_dl.services.flink_config import local_config_dir, write_config  # noqa: F401  (local_config_dir: re-exported)
from beam_dl.services.process import ServiceError, free_port, port_open

START_TIMEOUT_S = 240  # four JVMs starting on 2 loaded cores
# Flink's default env.java.opts.all for Java 17 (its config.yaml): Kryo and Pekko reflect into java.base.
JAVA_17_OPTS = (
  '-XX:+IgnoreUnrecognizedVMOptions',
  '--add-exports=java.base/sun.net.util=ALL-UNNAMED',
  '--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED',
  '--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED',
  *(
    f'--add-opens=java.base/{p}=ALL-UNNAMED'
    for p in (
      'java.lang',
      'java.net',
      'java.io',
      'java.nio',
      'sun.nio.ch',
      'java.lang.reflect',
      'java.text',
      'java.time',
      'java.util',
      'java.util.concurrent',
      'java.util.concurrent.atomic',
      'java.util.concurrent.locks',
    )
  ),
)
# Flink's and Beam's logs go through slf4j-simple on this classpath: time-stamped, to read recovery times.
LOG_OPTS = ('-Dorg.slf4j.simpleLogger.showDateTime=true', '-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS')


def unavailable() -> str | None:
  """None when the cluster can start here, else what to run."""
  return missing('flink', 'flink-runtime-*.jar')


def flink_config(
  *,
  rpc_port: int,
  rest_port: int,
  blob_port: int,
  slots: int,
  bind_host: str,
  tm_memory_mb: int,
  jm_memory_mb: int,
  tmp_dir: str,
  state_dir: str,
) -> dict[str, object]:
  """The cluster's config.yaml (flat keys).

  Memory: a JobManager of jm_memory_mb, TaskManagers of tm_memory_mb with a
  small managed memory (the Python workers, not Flink, hold the data) and
  enough network buffers for a batch job's blocking shuffles.
  Heartbeats of 2 s / 10 s: a TaskManager killed mid-job is declared lost
  within seconds, and the fixed-delay restart strategy reruns its work.
  Checkpoints (a streaming job's `--checkpointing_interval`) and savepoints
  are files under state_dir, so a job outlives the JobManager's memory and a
  stopped job can start again from its savepoint (`--savepoint_path`).
  """
  return {
    'jobmanager.rpc.address': '127.0.0.1',
    'jobmanager.rpc.port': rpc_port,
    'jobmanager.bind-host': bind_host,
    'taskmanager.bind-host': bind_host,
    'taskmanager.host': '127.0.0.1',
    'taskmanager.rpc.port': '0',
    'taskmanager.data.port': 0,
    'rest.address': '127.0.0.1',
    'rest.bind-address': bind_host,
    'rest.port': rest_port,
    'blob.server.port': str(blob_port),
    'metrics.internal.query-service.port': '0',
    'jobmanager.memory.process.size': f'{jm_memory_mb}m',
    'jobmanager.memory.jvm-metaspace.size': '192m',
    'jobmanager.memory.jvm-overhead.min': '64m',
    'taskmanager.memory.process.size': f'{tm_memory_mb}m',
    'taskmanager.memory.jvm-metaspace.size': '160m',
    'taskmanager.memory.jvm-overhead.min': '48m',
    'taskmanager.memory.framework.heap.size': '64m',
    # Batch shuffles read through a direct-memory pool inside the framework's off-heap memory.
    'taskmanager.memory.framework.off-heap.size': '64m',
    'taskmanager.memory.framework.off-heap.batch-shuffle.size': '32m',
    # Each blocking (batch) result partition holds sort-shuffle.min-buffers (512 by default)
    # of the TaskManager's network buffers: a batch job of a dozen steps needs them smaller.
    'taskmanager.memory.network.min': '48m',
    'taskmanager.memory.network.max': '48m',
    'taskmanager.memory.segment-size': '16kb',
    'taskmanager.network.sort-shuffle.min-buffers': 64,
    'taskmanager.memory.managed.fraction': '0.05',
    'taskmanager.numberOfTaskSlots': slots,
    'cluster.evenly-spread-out-slots': 'true',
    'restart-strategy.type': 'fixed-delay',
    'restart-strategy.fixed-delay.attempts': 20,
    # Longer than a job keeps an idle Python worker: a rerun never gets one that died (cluster.py).
    'restart-strategy.fixed-delay.delay': f'{WORKER_REUSE_MS + 1000} ms',
    'heartbeat.interval': 2000,
    'heartbeat.timeout': 10000,
    'state.checkpoints.dir': f'file://{os.path.join(state_dir, "checkpoints")}',
    'state.savepoints.dir': f'file://{os.path.join(state_dir, "savepoints")}',
    'io.tmp.dirs': tmp_dir,
    'web.tmpdir': tmp_dir,
    'blob.storage.directory': tmp_dir,
    'env.java.opts.all': ' '.join(JAVA_17_OPTS),
  }


def resource_params(lib: str, conf_dir: str, which: str) -> tuple[list[str], list[str]]:
  """(JVM flags, `-D key=value` dynamic properties) Flink's scripts compute
  for the JobManager ('JM') or a TaskManager ('TM') from the config."""
  result = subprocess.run(
    [
      'java',
      '-cp',
      os.path.join(lib, '*'),
      'org.apache.flink.runtime.util.bash.BashJavaUtils',
      f'GET_{which}_RESOURCE_PARAMS',
      '--configDir',
      conf_dir,
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  marker = 'BASH_JAVA_UTILS_EXEC_RESULT:'
  lines = [line[len(marker) :] for line in result.stdout.splitlines() if line.startswith(marker)]
  if result.returncode or len(lines) < 2:
    raise ServiceError(f'Flink could not size the {which} from {conf_dir}:\n{(result.stdout + result.stderr)[-3000:]}')
  return shlex.split(lines[-2]), shlex.split(lines[-1])


def worker_env(env: dict | None) -> dict[str, str]:
  """The environment of a cluster's JVMs, which its Python workers inherit:
  this interpreter first on PATH (the boot binary runs `python`), and no venv
  of the boot binary's own (the workers run in this environment)."""
  env = dict(os.environ if env is None else env)
  env['PATH'] = os.pathsep.join((os.path.dirname(sys.executable), env.get('PATH', '')))
  env['RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT'] = '1'
  return env


class FlinkCluster(LocalCluster):
  """Context manager: a Flink session cluster, Beam's job server on it, and
  Python workers it owns; `runner_flags` are what a pipeline passes."""

  name = 'Flink'

  def __init__(
    self,
    taskmanagers: int = 2,
    slots: int = 1,
    *,
    workdir: str | None = None,
    bind_host: str = '127.0.0.1',
    tm_memory_mb: int = 512,
    jm_memory_mb: int = 640,
    job_server_heap_mb: int = 512,
    start_timeout_s: float = START_TIMEOUT_S,
    env: dict | None = None,
    with_kafka_io: bool = False,
  ):
    reason = unavailable() or (with_kafka_io and kafka_io.unavailable())
    if reason:
      raise ServiceError(reason)
    if taskmanagers < 1 or slots < 1:
      raise ValueError(f'taskmanagers and slots must be >= 1, got {taskmanagers}, {slots}')
    super().__init__(workdir, worker_env(env), start_timeout_s)
    self.taskmanagers, self.slots = taskmanagers, slots
    self.bind_host = bind_host
    self._tm_mb, self._jm_mb, self._js_mb = tm_memory_mb, jm_memory_mb, job_server_heap_mb
    self.lib = job_server_lib('flink')
    self.rest_port = free_port()
    self.job_port = free_port()
    self.with_kafka_io = with_kafka_io
    self.expansion_port = free_port() if with_kafka_io else None

  def _start(self) -> None:
    conf = os.path.join(self.workdir, 'conf')
    tmp = os.path.join(self.workdir, 'tmp')
    os.makedirs(tmp, exist_ok=True)
    write_config(
      conf,
      flink_config(
        rpc_port=free_port(),
        rest_port=self.rest_port,
        blob_port=free_port(),
        slots=self.slots,
        bind_host=self.bind_host,
        tm_memory_mb=self._tm_mb,
        jm_memory_mb=self._jm_mb,
        tmp_dir=tmp,
        state_dir=self.workdir,
      ),
    )
    jm_jvm, jm_props = resource_params(self.lib, conf, 'JM')
    tm_jvm, tm_props = resource_params(self.lib, conf, 'TM')
    # With kafka_io, Beam's Java KafkaIO on every JVM's classpath: the job server translates the
    # read, the TaskManagers run it (EMBEDDED Java environment), like `beam_dl.services.kafka_io`.
    classpath = os.pathsep.join(
      [os.path.join(self.lib, '*'), *([os.path.join(kafka_io.kafka_io_lib(), '*')] if self.with_kafka_io else [])]
    )
    java = ['java', *JAVA_17_OPTS, *LOG_OPTS, '-XX:+UseSerialGC', '-cp', classpath]
    self.processes.start(
      'jobmanager',
      [
        *java[:1],
        *jm_jvm,
        *java[1:],
        'org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint',
        '--configDir',
        conf,
        *jm_props,
      ],
      self.log_path('jobmanager'),
    )
    for i in range(self.taskmanagers):
      # Its own working directory: the boot binary writes each job's pipeline_options.json there.
      cwd = os.path.join(self.workdir, f'taskmanager-{i}')
      os.makedirs(cwd, exist_ok=True)
      self.processes.start(
        f'taskmanager-{i}',
        [
          *java[:1],
          *tm_jvm,
          *java[1:],
          'org.apache.flink.runtime.taskexecutor.TaskManagerRunner',
          '--configDir',
          conf,
          *tm_props,
        ],
        self.log_path(f'taskmanager-{i}'),
        restart=True,
        cwd=cwd,
      )
    self.processes.start(
      'job_server',
      [
        'java',
        f'-Xmx{self._js_mb}m',
        *JAVA_17_OPTS,
        *LOG_OPTS,
        '-XX:+UseSerialGC',
        '-cp',
        classpath,
        'org.apache.beam.runners.flink.FlinkJobServerDriver',
        '--flink-master',
        self.flink_master,
        '--artifacts-dir',
        os.path.join(self.workdir, 'artifacts'),
        '--job-host',
        '127.0.0.1',
        '--job-port',
        str(self.job_port),
        '--artifact-port',
        '0',
        '--expansion-port',
        '0',
      ],
      self.log_path('job_server'),
    )
    members = ['jobmanager', 'job_server', *(f'taskmanager-{i}' for i in range(self.taskmanagers))]
    if self.with_kafka_io:
      self.processes.start(
        'expansion_service',
        kafka_io.expansion_service_command(self.expansion_port, extra_classpath=tuple(staging_jar(self.lib))),
        self.log_path('expansion_service'),
      )
      members.append('expansion_service')
    self.wait_until(
      lambda: (
        self.registered_taskmanagers() >= self.taskmanagers
        and port_open(self.job_port)
        and (not self.with_kafka_io or port_open(self.expansion_port, 'localhost'))
      ),
      members,
    )
    self.processes.supervise()

  # ----------------------------------------------------------------- state

  @property
  def flink_master(self) -> str:
    return f'127.0.0.1:{self.rest_port}'

  @property
  def runner_flags(self) -> list[str]:
    """The flags that run a pipeline on this cluster, at one task per slot."""
    return [
      '--runner=FlinkRunner',
      f'--flink_master={self.flink_master}',
      f'--job_endpoint=127.0.0.1:{self.job_port}',
      f'--parallelism={self.taskmanagers * self.slots}',
      *process_worker_flags(),
      *staging_flags(self.lib),
    ]

  @property
  def source_flags(self) -> list[str]:
    """The flags that read Kafka with Beam's KafkaIO on this cluster (with_kafka_io), for the
    pipelines that read Kafka (score_sequences); none otherwise."""
    return kafka_io.reader_flags(f'localhost:{self.expansion_port}') if self.with_kafka_io else []

  def registered_taskmanagers(self) -> int:
    """TaskManagers the JobManager counts now (a killed one until its heartbeat times out)."""
    overview = http_json(self.rest_port, '/taskmanagers')
    return len(overview['taskmanagers']) if overview else 0

  def jobs(self) -> list[dict]:
    """[{'id', 'status'}] of the JobManager's jobs."""
    overview = http_json(self.rest_port, '/jobs')
    return overview['jobs'] if overview else []

  def running_jobs(self) -> list[str]:
    """Ids of the jobs that run now."""
    return [job['id'] for job in self.jobs() if job['status'] == 'RUNNING']

  def stop_with_savepoint(self, job_id: str, timeout_s: float = 120) -> str:
    """Stops a streaming job with a savepoint (Flink's `flink stop`); returns the
    savepoint's path, for `--savepoint_path` of the job that takes over."""
    trigger = http_json(self.rest_port, f'/jobs/{job_id}/stop', 'POST', {'drain': False})
    if not trigger or 'request-id' not in trigger:
      raise ServiceError(f'Flink refused to stop job {job_id} with a savepoint: {trigger}')
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      answer = http_json(self.rest_port, f'/jobs/{job_id}/savepoints/{trigger["request-id"]}') or {}
      if answer.get('status', {}).get('id') == 'COMPLETED':
        operation = answer.get('operation', {})
        if 'location' not in operation:
          raise ServiceError(f'the savepoint of job {job_id} failed: {operation.get("failure-cause", operation)}')
        return operation['location']
      time.sleep(0.5)
    raise ServiceError(f'no savepoint of job {job_id} within {timeout_s:g} s')

  def cancel_job(self, job_id: str) -> None:
    """Cancels a job (an unbounded read never ends on its own)."""
    http_json(self.rest_port, f'/jobs/{job_id}?mode=cancel', 'PATCH')

  def taskmanager_pids(self, i: int) -> list[int]:
    """The TaskManager JVM and every process it started (boot binary, SDK workers)."""
    return self.processes.pids(f'taskmanager-{i}')

  def kill_taskmanager(self, i: int) -> int:
    """SIGKILL to TaskManager i's JVM only; the supervisor ends its workers and restarts it."""
    return kill_member(self, f'taskmanager-{i}')


def parse_args(argv):
  parser = command_line('beam_dl.services.flink_cluster', __doc__.split('\n')[0], 'config and logs')
  parser.add_argument('--taskmanagers', type=int, default=2)
  parser.add_argument('--slots', type=int, default=1, help='task slots per TaskManager')
  parser.add_argument('--taskmanager_memory_mb', type=int, default=512)
  parser.add_argument(
    '--kafka_io',
    action='store_true',
    help="Beam's Java KafkaIO on the cluster and an expansion service for it (make kafka-io); "
    'a second line of flags reads Kafka with it (score_sequences)',
  )
  args = parser.parse_args(argv)
  refuse_unless(
    parser,
    [
      (args.taskmanagers < 1 or args.slots < 1) and '--taskmanagers and --slots must be >= 1',
      args.taskmanager_memory_mb < 400 and '--taskmanager_memory_mb must be >= 400 (Flink needs its metaspace)',
      unavailable(),
      args.kafka_io and kafka_io.unavailable(),
    ],
  )
  return args


def main(argv=None):
  import logging  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', stream=sys.stderr)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cluster = FlinkCluster(
    args.taskmanagers,
    args.slots,
    workdir=args.workdir,
    bind_host=args.bind_host,
    tm_memory_mb=args.taskmanager_memory_mb,
    with_kafka_io=args.kafka_io,
  )
  return serve(cluster, f'{args.taskmanagers} TaskManagers x {args.slots} slots')


if __name__ == '__main__':
  sys.exit(main())
