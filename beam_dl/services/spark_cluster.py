"""A Spark 3 standalone cluster on this machine, with Beam's job server and Python workers it owns.

    make runners                                         # once: .runners/ (job server, -lib/, boot binary)
    python -m beam_dl.services.spark_cluster --workers 2
    # prints one line of runner flags, runs until Ctrl-C or SIGTERM:
    # --runner=SparkRunner --spark_master_url=spark://127.0.0.1:P --job_endpoint=127.0.0.1:J
    #   --environment_type=PROCESS --environment_config={"command": ".../.runners/python_boot"}
    #   --environment_cache_millis=3000

    with SparkCluster(workers=2) as cluster:             # tests and benchmarks
      ... cluster.runner_flags ...

A Master (`org.apache.spark.deploy.master.Master`), Workers of one core
each (`...deploy.worker.Worker`) and Beam's Spark job server
(`SparkJobServerDriver`, the Spark driver) run as separate JVMs on the job
server's own `-lib/` classpath (Spark 3.2.2). A Worker starts executors the
way Spark does, from SPARK_HOME's `jars/`: a temp SPARK_HOME links that
classpath (less slf4j-simple, which would shadow Spark's log4j binding).
On Java 17 every JVM gets Spark's `--add-opens` through JDK_JAVA_OPTIONS
(executors inherit it; without it they die in a relaunch loop) and
SPARK_LOCAL_IP binds everything, web UIs included, to `bind_host`
(127.0.0.1 by default), but the ports Beam 2.62's job server and Fn API
servers bind on all interfaces (docs/clusters.md, Ports).

Python SDK workers run as PROCESS environments under the executors (Beam's
boot binary, `make boot`). The processes are supervised as in
`beam_dl.services.cluster`: a Worker that dies is restarted after its
executors and their Python workers are ended.
"""

from __future__ import annotations

import glob
import os
import sys

from beam_dl.services.cluster import (
  ClusterProcesses,
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
)
from beam_dl.services.flink_cluster import worker_env
from beam_dl.services.process import ServiceError, free_port, port_open

START_TIMEOUT_S = 240


def unavailable() -> str | None:
  """None when the cluster can start here, else what to run."""
  return missing('spark', 'spark-core_*.jar')


def java_17_options() -> str:
  """Beam's SparkRunner's JVM flags for Java 17 (the --add-opens Spark needs)."""
  from apache_beam.runners.portability import spark_runner  # pylint: disable=g-import-not-at-top

  return ' '.join(spark_runner.SPARK_JAR_JOB_SERVER_JVM_ARGS)


def make_spark_home(path: str, lib: str) -> str:
  """A SPARK_HOME whose jars/ links every jar of lib but slf4j-simple; its
  RELEASE file makes Spark's launcher take jars/ as the classpath of the
  executors a Worker starts (as in a Spark distribution)."""
  jars = os.path.join(path, 'jars')
  os.makedirs(jars, exist_ok=True)
  with open(os.path.join(path, 'RELEASE'), 'w', encoding='utf-8') as f:
    f.write(f'Spark jars of {lib}\n')
  for jar in glob.glob(os.path.join(lib, '*.jar')):
    link = os.path.join(jars, os.path.basename(jar))
    if not os.path.basename(jar).startswith('slf4j-simple') and not os.path.lexists(link):  # a reused workdir has them
      os.symlink(jar, link)
  return path


def master_state(web_port: int) -> dict | None:
  """The Master's /json/ state (aliveworkers, activeapps, ...); None while it does not answer."""
  return http_json(web_port, '/json/')


class SparkCluster(LocalCluster):
  """Context manager: a Spark standalone cluster, Beam's job server as its
  driver, and Python workers it owns; `runner_flags` are what a pipeline passes."""

  name = 'Spark'

  def __init__(
    self,
    workers: int = 2,
    *,
    cores: int = 1,
    workdir: str | None = None,
    bind_host: str = '127.0.0.1',
    executor_memory_mb: int = 512,
    start_timeout_s: float = START_TIMEOUT_S,
    env: dict | None = None,
  ):
    reason = unavailable()
    if reason:
      raise ServiceError(reason)
    if workers < 1 or cores < 1:
      raise ValueError(f'workers and cores must be >= 1, got {workers}, {cores}')
    super().__init__(workdir, {}, start_timeout_s)
    self.workers, self.cores = workers, cores
    self.bind_host = bind_host
    self._executor_mb = executor_memory_mb
    self.lib = job_server_lib('spark')
    self.master_port, self.web_port, self.job_port = free_port(), free_port(), free_port()
    self.spark_home = os.path.join(self.workdir, 'spark_home')
    env = worker_env(env)
    env['JDK_JAVA_OPTIONS'] = java_17_options()  # executors inherit it: Spark's --add-opens on Java 17
    env['SPARK_LOCAL_IP'] = bind_host
    env['SPARK_HOME'] = self.spark_home
    env['SPARK_SCALA_VERSION'] = glob.glob(os.path.join(self.lib, 'spark-core_*.jar'))[0].split('_')[-1].split('-')[0]
    self.processes = ClusterProcesses(env, cwd=self.workdir)

  @property
  def master_url(self) -> str:
    return f'spark://127.0.0.1:{self.master_port}'

  @property
  def runner_flags(self) -> list[str]:
    return [
      '--runner=SparkRunner',
      f'--spark_master_url={self.master_url}',
      f'--job_endpoint=127.0.0.1:{self.job_port}',
      *process_worker_flags(),
      *staging_flags(self.lib),
    ]

  def alive_workers(self) -> int:
    state = master_state(self.web_port)
    return int(state.get('aliveworkers', 0)) if state else 0

  def _start(self) -> None:
    make_spark_home(self.spark_home, self.lib)
    classpath = os.path.join(self.spark_home, 'jars', '*')
    self.processes.start(
      'master',
      [
        'java',
        '-Xmx256m',
        '-XX:+UseSerialGC',
        '-cp',
        classpath,
        'org.apache.spark.deploy.master.Master',
        '--host',
        '127.0.0.1',
        '--port',
        str(self.master_port),
        '--webui-port',
        str(self.web_port),
      ],
      self.log_path('master'),
    )
    self.wait_until(lambda: master_state(self.web_port) is not None, ['master'])
    for i in range(self.workers):
      work = os.path.join(self.workdir, f'worker-{i}')
      os.makedirs(work, exist_ok=True)
      self.processes.start(
        f'worker-{i}',
        [
          'java',
          '-Xmx256m',
          '-XX:+UseSerialGC',
          '-cp',
          classpath,
          'org.apache.spark.deploy.worker.Worker',
          '--host',
          '127.0.0.1',
          '--port',
          '0',
          '--webui-port',
          str(free_port()),
          '--cores',
          str(self.cores),
          '--memory',
          f'{self._executor_mb + 128}m',
          '--work-dir',
          work,
          self.master_url,
        ],
        self.log_path(f'worker-{i}'),
        restart=True,
        cwd=work,
      )
    self.processes.start(
      'job_server',
      [
        'java',
        '-Xmx768m',
        '-XX:+UseSerialGC',
        '-Dspark.ui.enabled=false',
        '-Dspark.driver.host=127.0.0.1',
        f'-Dspark.driver.bindAddress={self.bind_host}',
        f'-Dspark.executor.memory={self._executor_mb}m',
        f'-Dspark.default.parallelism={self.workers * self.cores}',
        '-cp',
        classpath,
        'org.apache.beam.runners.spark.SparkJobServerDriver',
        '--spark-master-url',
        self.master_url,
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
    names = ['master', 'job_server', *(f'worker-{i}' for i in range(self.workers))]
    self.wait_until(lambda: self.alive_workers() >= self.workers and port_open(self.job_port), names)
    self.processes.supervise()

  def kill_worker(self, i: int) -> int:
    """SIGKILL to Worker i's JVM only; the supervisor ends its executors and
    their Python workers and restarts it."""
    return kill_member(self, f'worker-{i}')


def parse_args(argv):
  parser = command_line('beam_dl.services.spark_cluster', __doc__.split('\n')[0], 'SPARK_HOME, work dirs and logs')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--cores', type=int, default=1, help='cores per Worker')
  parser.add_argument('--executor_memory_mb', type=int, default=512)
  args = parser.parse_args(argv)
  refuse_unless(parser, [(args.workers < 1 or args.cores < 1) and '--workers and --cores must be >= 1', unavailable()])
  return args


def main(argv=None):
  import logging  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', stream=sys.stderr)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cluster = SparkCluster(
    args.workers,
    cores=args.cores,
    workdir=args.workdir,
    bind_host=args.bind_host,
    executor_memory_mb=args.executor_memory_mb,
  )
  return serve(cluster, f'{args.workers} Workers x {args.cores} cores')


if __name__ == '__main__':
  sys.exit(main())
