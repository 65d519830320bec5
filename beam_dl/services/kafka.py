"""A single-node Kafka broker (KRaft: broker and controller in one JVM) on 127.0.0.1.

    make kafka-jars                      # once: Maven Central -> .cache/kafka/lib
    python -m beam_dl.services.kafka --topics events,scores
                                         # prints the bootstrap address once the topics exist,
                                         # runs until Ctrl-C or SIGTERM

    with KafkaBroker() as broker:        # tests and benchmarks
      broker.create_topic('events')
      ... broker.bootstrap ...           # '127.0.0.1:<free port>'

The broker formats a fresh storage directory (`kafka.tools.StorageTool`),
starts `kafka.Kafka` in its own process group, polls it ready with a
deadline (raising with the log tail if it exits or never answers) and kills
the whole group on exit. Jars come from `third_party/kafka/pom.xml`
(org.apache.kafka:kafka_2.13); `KAFKA_LIB` overrides their folder.
"""

from __future__ import annotations

import argparse
import base64
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from beam_dl.services.process import (
  ServiceError,
  free_port,
  log_tail,
  port_open,
  serve_until_stopped,
  stop_process_group,
  stopped_by_signals,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_LIB = os.path.join(ROOT, '.cache', 'kafka', 'lib')


class BrokerError(ServiceError):
  """The broker's jars are missing, or it exited or never answered in time."""


def kafka_lib() -> str:
  return os.environ.get('KAFKA_LIB', DEFAULT_LIB)


def jars_available() -> bool:
  return bool(glob.glob(os.path.join(kafka_lib(), 'kafka_2.13-*.jar')))


def server_properties(port: int, controller_port: int, log_dir: str) -> str:
  """KRaft settings for one node that is both broker and controller, replication 1."""
  return '\n'.join(
    [
      'process.roles=broker,controller',
      'node.id=1',
      f'controller.quorum.voters=1@127.0.0.1:{controller_port}',
      f'listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}',
      f'advertised.listeners=PLAINTEXT://127.0.0.1:{port}',
      'controller.listener.names=CONTROLLER',
      'inter.broker.listener.name=PLAINTEXT',
      'listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT',
      f'log.dirs={log_dir}',
      'num.partitions=1',
      'offsets.topic.replication.factor=1',
      'transaction.state.log.replication.factor=1',
      'transaction.state.log.min.isr=1',
      'share.coordinator.state.topic.replication.factor=1',
      'share.coordinator.state.topic.min.isr=1',
      'group.initial.rebalance.delay.ms=0',
      'auto.create.topics.enable=false',
      # Keep every record: tests stamp events in 1970, which time-based retention
      # (7 days by record time, checked every 5 min) would delete mid-run.
      'log.retention.ms=-1',
      '',
    ]
  )


def new_cluster_id() -> str:
  """A KRaft cluster id: a random UUID in URL-safe base64, as Kafka's
  `Uuid.randomUuid()` makes it, never starting with '-' (1 in 64 would:
  StorageTool's parser then reads it as a flag, "--cluster-id: expected one
  argument", and the broker never starts)."""
  while True:
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b'=').decode()
    if not cluster_id.startswith('-'):
      return cluster_id


class KafkaBroker:
  """Context manager: a fresh single-node broker; `bootstrap` is its address."""

  def __init__(self, workdir: str | None = None, *, heap_mb: int = 512, start_timeout_s: float = 90.0):
    if not jars_available():
      raise BrokerError(f'no Kafka jars in {kafka_lib()}: run `make kafka-jars`')
    self._own_dir = workdir is None
    self.workdir = workdir or tempfile.mkdtemp(prefix='kafka_')
    self._heap_mb = heap_mb
    self._timeout = start_timeout_s
    self.port = free_port()
    self.bootstrap = f'127.0.0.1:{self.port}'
    self.log_path = os.path.join(self.workdir, 'broker.log')
    self._proc: subprocess.Popen | None = None

  def _java(self, main: str, *args: str) -> list[str]:
    return [
      'java',
      f'-Xmx{self._heap_mb}m',
      '-Xms128m',
      '-XX:+UseSerialGC',
      '-XX:TieredStopAtLevel=1',
      '-cp',
      os.path.join(kafka_lib(), '*'),
      main,
      *args,
    ]

  def start(self) -> 'KafkaBroker':
    config = os.path.join(self.workdir, 'server.properties')
    with open(config, 'w', encoding='utf-8') as f:
      f.write(server_properties(self.port, free_port(), os.path.join(self.workdir, 'data')))
    cluster_id = new_cluster_id()
    fmt = subprocess.run(
      self._java('kafka.tools.StorageTool', 'format', '-t', cluster_id, '-c', config),
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )
    if fmt.returncode:
      raise BrokerError(f'formatting Kafka storage failed: {fmt.stdout[-2000:]}{fmt.stderr[-2000:]}')
    with open(self.log_path, 'ab') as log:
      self._proc = subprocess.Popen(
        self._java('kafka.Kafka', config),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=self.workdir,
      )
    try:
      self._wait_ready()
    except BaseException:
      self.stop()
      raise
    return self

  def _wait_ready(self):
    from confluent_kafka.admin import AdminClient  # pylint: disable=g-import-not-at-top

    deadline = time.monotonic() + self._timeout
    admin = None
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        raise BrokerError(f'Kafka exited with {self._proc.returncode}:\n{log_tail(self.log_path)}')
      if admin is None and port_open(self.port):  # no client until the port answers: no retry noise
        admin = AdminClient({'bootstrap.servers': self.bootstrap, 'log_level': 0})
      if admin is not None:
        try:
          if admin.list_topics(timeout=2).brokers:
            return
        except Exception:  # KafkaException until the broker has registered with its controller
          pass
      time.sleep(0.2)
    raise BrokerError(
      f'Kafka did not answer on {self.bootstrap} within {self._timeout:g} s:\n{log_tail(self.log_path)}'
    )

  @property
  def pid(self) -> int | None:
    """The broker JVM's pid while it runs."""
    return self._proc.pid if self._proc is not None else None

  def create_topic(self, name: str, partitions: int = 1, timeout_s: float = 30.0):
    """Creates `name` and waits (bounded) until its partitions have leaders."""
    from confluent_kafka.admin import AdminClient, NewTopic  # pylint: disable=g-import-not-at-top

    admin = AdminClient({'bootstrap.servers': self.bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      topic = admin.list_topics(name, timeout=2).topics.get(name)
      if (
        topic
        and not topic.error
        and len(topic.partitions) == partitions
        and all(p.leader >= 0 for p in topic.partitions.values())
      ):
        return
      time.sleep(0.1)
    raise BrokerError(f'topic {name} has no leader after {timeout_s:g} s')

  def stop(self):
    """Kills the broker's process group (TERM, then KILL after 10 s); removes its own workdir."""
    proc, self._proc = self._proc, None
    if proc is not None:
      stop_process_group(proc)
    if self._own_dir:
      shutil.rmtree(self.workdir, ignore_errors=True)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog='python -m beam_dl.services.kafka',
    description='A local single-node Kafka broker: prints its bootstrap address once ready (and its topics made), '
    'runs until Ctrl-C or SIGTERM, and stops its JVM either way.',
  )
  parser.add_argument(
    '--topics',
    default='',
    help='comma-separated topics to create before the address is printed '
    '(the broker does not create topics on first use)',
  )
  parser.add_argument('--partitions', type=int, default=1, help='partitions per created topic')
  args = parser.parse_args(argv)
  topics = list(dict.fromkeys(t.strip() for t in args.topics.split(',') if t.strip()))
  if args.partitions < 1:
    parser.error(f'--partitions must be >= 1, got {args.partitions}')
  with stopped_by_signals(), KafkaBroker() as broker:
    for topic in topics:
      broker.create_topic(topic, args.partitions)
    print(broker.bootstrap, flush=True)
    serve_until_stopped()


if __name__ == '__main__':
  sys.exit(main())
