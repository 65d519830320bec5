"""Beam's Java KafkaIO for cross-language reads on a local Flink: expansion service and job server.

    make runners kafka-io                 # once: the Flink job server, KafkaIO jars (.runners/)
    python -m beam_dl.services.kafka_io   # prints the job endpoint and expansion service, runs until Ctrl-C

    with flink_with_kafka_io(log_dir) as (job_endpoint, expansion_service):
      ... --runner FlinkRunner --job_endpoint JOB --environment_type LOOPBACK
          --kafka_reader xlang --kafka_expansion_service EXPANSION ...

Beam's shaded expansion-service jars are not on the Maven mirror this
project builds from, so `third_party/kafka-io/pom.xml` assembles the same
classes from non-shaded Beam 2.62 artifacts (beam-sdks-java-io-kafka,
-expansion-service, -harness, kafka-clients, jamm) into
`.runners/kafka-io-lib/`. Two JVMs use that folder:

* the expansion service (`org.apache.beam.sdk.expansion.service.ExpansionService
  <port> --defaultEnvironmentType=EMBEDDED --experiments=use_deprecated_read`):
  it expands ReadFromKafka into Java transforms whose environment is
  EMBEDDED, i.e. the Java SDK harness runs inside the Flink task manager, no
  Docker; the experiment makes the read Flink's native source (see
  `KAFKA_READ_EXPERIMENT`);
* the Flink job server (`FlinkJobServerDriver`, `[local]` Flink), with that
  folder on its classpath beside its own, so the embedded harness finds
  KafkaIO, kafka-clients and jamm.

Python steps run LOOPBACK (in the submitting process). Each process is its
own group, polled ready with a deadline and killed on exit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
from typing import Iterator

from beam_dl.services.flink_config import local_config_dir
from beam_dl.services.process import (
  ServiceError,
  free_port,
  port_open,
  serve_until_stopped,
  service_process,
  stopped_by_signals,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNERS_DIR = os.environ.get('BEAM_DL_RUNNERS_DIR', os.path.join(ROOT, '.runners'))
START_TIMEOUT_S = 240  # JVMs starting Flink on 2 loaded cores
# Flink's Kryo serializers reflect into java.base on Java 17 (as runners/flink/pom.xml's manifest says).
ADD_OPENS = (
  'java.base/java.lang',
  'java.base/java.util',
  'java.base/java.lang.reflect',
  'java.base/java.io',
  'java.base/java.net',
  'java.base/java.nio',
  'java.base/sun.nio.ch',
  'java.base/java.util.concurrent',
)


def kafka_io_lib() -> str:
  return os.environ.get('BEAM_DL_KAFKA_IO_LIB', os.path.join(RUNNERS_DIR, 'kafka-io-lib'))


def flink_job_server_jar() -> str | None:
  found = sorted(glob.glob(os.path.join(RUNNERS_DIR, '*flink*job-server*.jar')))
  return found[-1] if found else None


def unavailable() -> str | None:
  """None when the jars are here, else what to run."""
  if not glob.glob(os.path.join(kafka_io_lib(), 'beam-sdks-java-io-kafka-*.jar')):
    return f'no KafkaIO jars in {kafka_io_lib()}: run `make kafka-io`'
  if not flink_job_server_jar():
    return f'no Flink job server in {RUNNERS_DIR}: run `make runners`'
  return None


# KafkaIO expands to its splittable DoFn by default. The portable Flink runner
# ends an SDF's bundle only when the SDF checkpoints itself, and KafkaIO's does
# so only when a poll comes back empty (2 s without records): under a steady
# stream its output stayed in the Flink operator until the producer stopped
# (p50 47.6 s at 200 events/s, benchmarks/RESULTS.md). With this experiment
# KafkaIO expands to its UnboundedSource, which Flink runs as a native source
# that emits each record as it is read.
KAFKA_READ_EXPERIMENT = 'use_deprecated_read'


def expansion_service_command(port: int, heap_mb: int = 384, extra_classpath: tuple[str, ...] = ()) -> list[str]:
  """The expansion service's command.

  `--filesToStage` names the one KafkaIO jar as the Java environment's
  dependency: by default the service lists its whole classpath (135 MB,
  135 jars), which the Python SDK then uploads to the job server with every
  job, although the EMBEDDED harness runs on the job server's or the
  TaskManagers' own classpath and never reads them. extra_classpath: classes
  the pipeline's options name, which the service parses (the clusters'
  `--pipeline_resources_detector_factory_class`).
  """
  kafka_jar = sorted(glob.glob(os.path.join(kafka_io_lib(), 'beam-sdks-java-io-kafka-*.jar')))[-1]
  return [
    'java',
    f'-Xmx{heap_mb}m',
    '-XX:+UseSerialGC',
    '-cp',
    os.pathsep.join([os.path.join(kafka_io_lib(), '*'), *extra_classpath]),
    'org.apache.beam.sdk.expansion.service.ExpansionService',
    str(port),
    '--defaultEnvironmentType=EMBEDDED',
    f'--experiments={KAFKA_READ_EXPERIMENT}',
    f'--filesToStage={kafka_jar}',
  ]


def flink_job_server_command(port: int, work_dir: str, heap_mb: int = 1536, master: str = '[local]') -> list[str]:
  """The job server's command; with master '[local]' its embedded Flink reads
  work_dir/flink_conf (`flink_config.local_config_dir`: bound to 127.0.0.1)."""
  conf = ['--flink-conf-dir', os.path.join(work_dir, 'flink_conf')] if master == '[local]' else []
  classpath = os.pathsep.join([flink_job_server_jar(), os.path.join(kafka_io_lib(), '*')])
  return [
    'java',
    f'-Xmx{heap_mb}m',
    *[f'--add-opens={m}=ALL-UNNAMED' for m in ADD_OPENS],
    '-cp',
    classpath,
    'org.apache.beam.runners.flink.FlinkJobServerDriver',
    '--flink-master',
    master,
    *conf,
    '--artifacts-dir',
    os.path.join(work_dir, 'flink_artifacts'),
    '--job-port',
    str(port),
    '--artifact-port',
    '0',
    '--expansion-port',
    '0',
  ]


@contextlib.contextmanager
def flink_with_kafka_io(log_dir: str | None = None, buffer_timeout_ms: int | None = None) -> Iterator[tuple[str, str]]:
  """A Flink job server and a KafkaIO expansion service until the block exits;
  yields ('localhost:JOB_PORT', 'localhost:EXPANSION_PORT').

  buffer_timeout_ms: Flink's network buffer timeout for the jobs it runs
  (`flink_config.local_config_dir`; None: Flink's 100 ms)."""
  reason = unavailable()
  if reason:
    raise ServiceError(reason)
  log_dir = log_dir or tempfile.mkdtemp(prefix='flink_kafka_io_')
  expansion, job = free_port(), free_port()
  local_config_dir(os.path.join(log_dir, 'flink_conf'), buffer_timeout_ms=buffer_timeout_ms)
  with (
    service_process(
      expansion_service_command(expansion),
      log_path=os.path.join(log_dir, 'expansion_service.log'),
      ready=lambda: port_open(expansion, 'localhost'),
      timeout_s=START_TIMEOUT_S,
      cwd=ROOT,
    ),
    service_process(
      flink_job_server_command(job, log_dir),
      log_path=os.path.join(log_dir, 'flink_job_server.log'),
      ready=lambda: port_open(job, 'localhost'),
      timeout_s=START_TIMEOUT_S,
      cwd=ROOT,
    ),
  ):
    yield f'localhost:{job}', f'localhost:{expansion}'


def cancel_running_jobs(job_endpoint: str, timeout_s: float = 30.0) -> list[str]:
  """Cancels every job of the job server that has not ended (an unbounded read never does); returns their ids."""
  import grpc  # pylint: disable=g-import-not-at-top
  from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc  # pylint: disable=g-import-not-at-top

  ended = {
    beam_job_api_pb2.JobState.DONE,
    beam_job_api_pb2.JobState.FAILED,
    beam_job_api_pb2.JobState.CANCELLED,
    beam_job_api_pb2.JobState.DRAINED,
    beam_job_api_pb2.JobState.UPDATED,
  }
  cancelled = []
  with grpc.insecure_channel(job_endpoint) as channel:
    stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
    for job in stub.GetJobs(beam_job_api_pb2.GetJobsRequest(), timeout=timeout_s).job_info:
      if job.state not in ended:
        stub.Cancel(beam_job_api_pb2.CancelJobRequest(job_id=job.job_id), timeout=timeout_s)
        cancelled.append(job.job_id)
  return cancelled


def runner_flags(job_endpoint: str, expansion_service: str) -> list[str]:
  """The flags of a pipeline on this service: the FlinkRunner through `job_endpoint`,
  Python steps LOOPBACK, Kafka read by Beam's Java KafkaIO from `expansion_service`."""
  return [
    '--runner',
    'FlinkRunner',
    '--job_endpoint',
    job_endpoint,
    '--environment_type',
    'LOOPBACK',
    *reader_flags(expansion_service),
  ]


def reader_flags(expansion_service: str) -> list[str]:
  """The flags that read Kafka with Beam's Java KafkaIO through `expansion_service` (host:port)."""
  return ['--kafka_reader=xlang', f'--kafka_expansion_service={expansion_service}']


def main():
  with stopped_by_signals(), flink_with_kafka_io() as (job, expansion):
    print(' '.join(runner_flags(job, expansion)), flush=True)
    serve_until_stopped()


if __name__ == '__main__':
  sys.exit(main())
