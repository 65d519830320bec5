"""Real services the tests start and stop: an MLflow tracking server, a one-node HDFS.

Each is a context manager over `beam_dl.services.process.service_process`:
its own process group on 127.0.0.1 with free ports, polled ready with a
deadline (raising with the log tail if it dies or never answers), the whole
group killed on exit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import sys
import urllib.request

from beam_dl.services.process import ServiceError, free_port, service_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HADOOP_LIB = os.path.join(ROOT, '.cache', 'hadoop', 'lib')
JAVA_OPENS = [
    '--add-opens=java.base/java.lang=ALL-UNNAMED',
    '--add-opens=java.base/java.nio=ALL-UNNAMED',
    '--add-opens=java.base/sun.nio.ch=ALL-UNNAMED',
    '--add-opens=java.base/java.util=ALL-UNNAMED',
]


def http_ok(url: str) -> bool:
  """Whether `url` answers 200 now (a readiness probe for `service_process`)."""
  try:
    with urllib.request.urlopen(url, timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


@contextlib.contextmanager
def mlflow_server(workdir: str, timeout_s: float = 240):
  """`mlflow server` with a sqlite backend and proxied artifacts under workdir;
  yields its tracking URI (http://127.0.0.1:PORT)."""
  os.makedirs(workdir, exist_ok=True)
  port = free_port()
  # No telemetry; no job-executor subprocesses (huey), which the registry never uses.
  env = {
      **os.environ, 'MLFLOW_DISABLE_TELEMETRY': 'true', 'DO_NOT_TRACK': 'true',
      'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false',
  }  # fmt: skip
  cmd = [
      sys.executable, '-m', 'mlflow', 'server',
      '--backend-store-uri', f"sqlite:///{os.path.join(workdir, 'mlflow.db')}",
      '--artifacts-destination', os.path.join(workdir, 'artifacts'),
      '--host', '127.0.0.1', '--port', str(port), '--workers', '1',
  ]  # fmt: skip
  uri = f'http://127.0.0.1:{port}'
  with service_process(
      cmd, log_path=os.path.join(workdir, 'server.log'), cwd=workdir, env=env,
      ready=lambda: http_ok(f'{uri}/health'), timeout_s=timeout_s,
  ):  # fmt: skip
    yield uri


def hadoop_jars() -> list[str]:
  """The minicluster jars `make hdfs` copies into .cache/hadoop/lib ([] if absent)."""
  return sorted(glob.glob(os.path.join(HADOOP_LIB, '*.jar')))


@dataclasses.dataclass(frozen=True)
class Hdfs:
  """A running HDFS: Beam's --hdfs_* options reach it over WebHDFS."""

  host: str
  http_port: int
  namenode_port: int
  user: str = 'beam'

  @property
  def beam_args(self) -> list[str]:
    return [f'--hdfs_host={self.host}', f'--hdfs_port={self.http_port}', f'--hdfs_user={self.user}']


@contextlib.contextmanager
def hdfs_cluster(workdir: str, timeout_s: float = 240):
  """One NameNode + one DataNode (Hadoop's MiniDFSClusterManager from
  hadoop-client-minicluster) with storage under workdir; yields an Hdfs."""
  jars = hadoop_jars()
  if not jars:
    raise ServiceError(f'no jars in {HADOOP_LIB}: run `make hdfs`')
  os.makedirs(workdir, exist_ok=True)
  http_port = free_port()
  details = os.path.join(workdir, 'details.json')
  cmd = [
      'java', '-Xmx768m', *JAVA_OPENS, '-cp', os.pathsep.join(jars),
      'org.apache.hadoop.test.MiniDFSClusterManager',
      '-format', '-datanodes', '1', '-nnport', '0', '-httpport', str(http_port),
      '-writeDetails', details,
      '-D', 'dfs.permissions.enabled=false',
      '-D', 'dfs.namenode.rpc-address=127.0.0.1:0',
      '-D', 'dfs.datanode.address=127.0.0.1:0',
      '-D', 'dfs.datanode.http.address=127.0.0.1:0',
      '-D', 'dfs.datanode.ipc.address=127.0.0.1:0',
      '-D', f"hadoop.tmp.dir={os.path.join(workdir, 'tmp')}",
  ]  # fmt: skip
  url = f'http://127.0.0.1:{http_port}/webhdfs/v1/?op=GETFILESTATUS&user.name=beam'
  with service_process(
      cmd, log_path=os.path.join(workdir, 'hdfs.log'), cwd=workdir,
      ready=lambda: os.path.exists(details) and http_ok(url), timeout_s=timeout_s,
  ):  # fmt: skip
    with open(details) as f:
      namenode_port = json.load(f)['namenode_port']
    yield Hdfs('127.0.0.1', http_port, namenode_port)


def cluster_env() -> dict[str, str]:
  """The environment a test cluster's JVMs, and so its Python SDK workers, run
  in: the repository on PYTHONPATH (workers unpickle `transforms.*` DoFns by
  reference), JAX on CPU with one device per worker."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH', '')) if p)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = ''
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return env


@contextlib.contextmanager
def flink_cluster(workdir: str, taskmanagers: int = 2, slots: int = 1):
  """`beam_dl.services.flink_cluster.FlinkCluster` (the code behind `python -m
  beam_dl.services.flink_cluster`) with its config and logs under workdir."""
  from beam_dl.services.flink_cluster import FlinkCluster  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with FlinkCluster(taskmanagers, slots, workdir=workdir, env=cluster_env()) as cluster:
    yield cluster


@contextlib.contextmanager
def spark_cluster(workdir: str, workers: int = 2):
  """`beam_dl.services.spark_cluster.SparkCluster` (the code behind `python -m
  beam_dl.services.spark_cluster`) with its SPARK_HOME, work dirs and logs under workdir."""
  from beam_dl.services.spark_cluster import SparkCluster  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with SparkCluster(workers, workdir=workdir, env=cluster_env()) as cluster:
    yield cluster
