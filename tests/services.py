"""Real services the tests start and stop: an MLflow tracking server, a one-node HDFS
(`beam_dl.services.hdfs`), Flink and Spark clusters; and reading a Kafka topic back whole.

Each is a context manager over `beam_dl.services.process.service_process`:
its own process group on 127.0.0.1 with free ports, polled ready with a
deadline (raising with the log tail if it dies or never answers), the whole
group killed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from beam_dl.services.hdfs import Hdfs, hadoop_jars, hdfs_cluster, http_ok  # noqa: F401  (the project's own)
from beam_dl.services.process import free_port, service_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
def flink_cluster(workdir: str, taskmanagers: int = 2, slots: int = 1, with_kafka_io: bool = False):
  """`beam_dl.services.flink_cluster.FlinkCluster` (the code behind `python -m
  beam_dl.services.flink_cluster`) with its config and logs under workdir."""
  from beam_dl.services.flink_cluster import FlinkCluster  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  with FlinkCluster(taskmanagers, slots, workdir=workdir, env=cluster_env(), with_kafka_io=with_kafka_io) as cluster:
    yield cluster


@contextlib.contextmanager
def spark_cluster(workdir: str, workers: int = 2):
  """`beam_dl.services.spark_cluster.SparkCluster` (the code behind `python -m
  beam_dl.services.spark_cluster`) with its SPARK_HOME, work dirs and logs under workdir."""
  from beam_dl.services.spark_cluster import SparkCluster  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  with SparkCluster(workers, workdir=workdir, env=cluster_env()) as cluster:
    yield cluster


def consume_all(bootstrap: str, topic: str, deadline_s: float = 120.0) -> list:
  """Every message on `topic` (JSON), from the first offset to the end offsets it has now (bounded).

  Reading to the end offsets (not "until idle") so that a slow fetch on a
  loaded machine cannot cut the read short.
  """
  from confluent_kafka import Consumer, TopicPartition

  consumer = Consumer(
    {
      'bootstrap.servers': bootstrap,
      'group.id': f'check-{topic}-{time.time()}',
      'enable.auto.commit': False,
      'log_level': 0,
    }
  )
  records, deadline = [], time.monotonic() + deadline_s
  try:
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30) for p in partitions}
    left = {p: (low, high) for p, (low, high) in ends.items() if high > low}
    consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in left.items()])
    while left and time.monotonic() < deadline:
      message = consumer.poll(0.2)
      if message is None or message.error():
        continue
      records.append(json.loads(message.value()))
      if message.offset() >= left.get(message.partition(), (0, 0))[1] - 1:
        left.pop(message.partition(), None)
    assert not left, f'{topic}: not read to its end offsets {ends} within {deadline_s:g} s'
  finally:
    consumer.close()
  return records
