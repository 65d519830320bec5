"""Pipelines on real local clusters (Flink, Spark standalone), and faults a cluster user meets.

A Flink session cluster (`beam_dl.services.flink_cluster`: a JobManager, two
TaskManagers of one slot, Beam's job server, Python SDK workers run by Beam's
boot binary) runs classify_images at parallelism 2; its outputs must equal
the DirectRunner's. Then a TaskManager is killed with SIGKILL while the
job's Python workers run on it: the job must still finish with every input
in exactly one output record, no temporary folder left, and nothing the
killed TaskManager started still running. The service's own entry point
prints one line of flags and stops every process it started on SIGTERM.
A Spark standalone cluster (`beam_dl.services.spark_cluster`: a Master, two
one-core Workers, Beam's job server as the driver) runs classify_images too,
equal to the DirectRunner, with Python workers under both Workers' executors;
then again with one executor killed with SIGKILL mid-job: every input once.

Each test starts JVMs (one cluster at a time): marked slow, with hard timeouts.
Skipped with the reason where `make runners` (job server, boot binary) has not run.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from beam_dl.formats.jsonl import read_jsonl
from beam_dl.services import flink_cluster as fc
from beam_dl.services import kafka_io
from beam_dl.services import spark_cluster as sc
from beam_dl.services.cluster import WORKER_REUSE_MS, http_json, job_server_ports
from beam_dl.services.process import is_loopback, listening_sockets, processes_tagged
from tests import runner_matrix as rm
from tests import services

PIPELINE = 'classify_images'


def _cmdline(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read().replace(b'\0', b' ').decode(errors='replace')
  except OSError:
    return ''


def _records_per_input(out_dir: str) -> collections.Counter:
  """How many output records (predictions and dead letters) name each input file."""
  prefix = os.path.join(out_dir, 'predictions')
  records = read_jsonl(prefix + '-[0-9]*.jsonl') + read_jsonl(prefix + '_failed-*.jsonl')
  return collections.Counter(os.path.basename(r['key']) for r in records)


def _run(data_dir: str, out_dir: str, flags: list[str], pipeline: str = PIPELINE) -> subprocess.Popen:
  os.makedirs(out_dir, exist_ok=True)
  log = open(os.path.join(out_dir, 'run.log'), 'wb')  # pylint: disable=consider-using-with
  argv = rm.PIPELINES[pipeline].argv(data_dir, out_dir) + flags
  return subprocess.Popen(
    [rm.PYTHON, '-m', rm.PIPELINES[pipeline].module, *argv],
    env=rm.subprocess_env(),
    cwd=rm.REPO,
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )


def _finish(process: subprocess.Popen, out_dir: str, timeout_s: float = 420) -> None:
  try:
    returncode = process.wait(timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    returncode = 'killed after timeout'
  with open(os.path.join(out_dir, 'run.log'), errors='replace') as f:
    log = f.read()
  assert returncode == 0, f'exited {returncode}:\n{log[-4000:]}'


def _start_ticks(pid: int) -> int:
  """When a process started (clock ticks after boot), 0 once it is gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return int(f.read().rsplit(')', 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return 0


def _log_text(cluster, member: str) -> str:
  """The member's log so far."""
  with open(cluster.log_path(member), errors='replace') as f:
    return f.read()


def _log_count(cluster, member: str, text: str) -> int:
  """How many times `text` is in the member's log so far."""
  return _log_text(cluster, member).count(text)


def _harness_starts(cluster, i: int) -> int:
  """Python SDK workers TaskManager i has started so far (their log lines reach its log)."""
  return _log_count(cluster, f'taskmanager-{i}', 'Python sdk harness starting')


def _beam_wildcard_ports(job_server_log: str) -> set[int]:
  """The two ports Beam 2.62's job server binds on all interfaces whatever --job-host says
  (docs/clusters.md, Ports): its job and artifact ports."""
  ports = job_server_ports(job_server_log)
  return {ports['JobService'], ports['ArtifactStagingService']}


def _assert_loopback_only(cluster, fn_api_members: tuple[str, ...] = ()) -> None:
  """Every TCP socket the cluster's processes listen on is on loopback, but the job server's two
  and, while a job runs, those of Beam's Fn API servers (control, data, state, logging,
  provisioning, artifacts) in fn_api_members, which Beam 2.62 binds on all interfaces too; so
  does the KafkaIO expansion service's one port. After a job (no fn_api_members) its Python
  workers, and their Fn API servers, live on for WORKER_REUSE_MS: the check waits that out."""
  deadline = time.monotonic() + (0 if fn_api_members else WORKER_REUSE_MS / 1000 + 10)
  while True:
    listening = cluster.processes.listening()
    exposed = {(member, port) for member, address, port in listening if not is_loopback(address)}
    expected = {('job_server', port) for port in _beam_wildcard_ports(cluster.log_path('job_server'))}
    if getattr(cluster, 'expansion_port', None):  # Beam's ExpansionService binds its one port on all interfaces
      expected.add(('expansion_service', cluster.expansion_port))
    assert listening and expected <= exposed, listening
    if {member for member, _ in exposed - expected} <= set(fn_api_members) or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  assert {member for member, _ in exposed - expected} <= set(fn_api_members), listening


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return rm.prepared_data(str(tmp_path_factory.getbasetemp() / 'matrix_data'), PIPELINE)


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp('direct'))
  _finish(_run(data_dir, out_dir, ['--runner=DirectRunner']), out_dir)
  canonical = rm.PIPELINES[PIPELINE].read(out_dir)
  rm.PIPELINES[PIPELINE].check(canonical)
  return canonical


# The rest of the runner matrix on the clusters (classify_images is the fault tests' job).
MATRIX = ('score_sequences', 'preprocess')


@pytest.fixture(scope='module')
def matrix_reference(tmp_path_factory):
  """pipeline -> (its prepared data dir, its DirectRunner outputs), made on first use."""
  made = {}

  def reference_of(pipeline: str):
    if pipeline not in made:
      data = rm.prepared_data(str(tmp_path_factory.getbasetemp() / 'matrix_data'), pipeline)
      out_dir = str(tmp_path_factory.mktemp(f'direct_{pipeline}'))
      _finish(_run(data, out_dir, ['--runner=DirectRunner'], pipeline), out_dir)
      canonical = rm.PIPELINES[pipeline].read(out_dir)
      rm.PIPELINES[pipeline].check(canonical)
      made[pipeline] = (data, canonical)
    return made[pipeline]

  return reference_of


def _equals_direct_on(cluster, pipeline: str, matrix_reference, tmp_path) -> None:
  data, reference = matrix_reference(pipeline)
  out_dir = str(tmp_path / 'out')
  _finish(_run(data, out_dir, cluster.runner_flags, pipeline), out_dir)
  rm.PIPELINES[pipeline].compare(rm.PIPELINES[pipeline].read(out_dir), reference)


def test_the_local_job_servers_flink_config_binds_loopback_and_sets_the_buffer_timeout(tmp_path):
  """What `local_config_dir` writes is Flink's flat YAML: loopback binds always,
  the network buffer timeout only when asked (Flink's 100 ms otherwise)."""
  plain = (tmp_path / 'plain').as_posix()
  fast = (tmp_path / 'fast').as_posix()
  fc.local_config_dir(plain)
  fc.local_config_dir(fast, buffer_timeout_ms=5)
  read = lambda d: dict(line.split(': ', 1) for line in open(os.path.join(d, 'config.yaml')).read().splitlines())
  assert read(plain)['rest.bind-address'] == '"127.0.0.1"'
  assert 'execution.buffer-timeout.interval' not in read(plain)
  assert read(fast)['execution.buffer-timeout.interval'] == '"5 ms"'


def test_a_spark_home_is_made_again_in_a_reused_workdir(tmp_path):
  """A second cluster in the same workdir (a benchmark's repeat, a restarted service) finds its
  SPARK_HOME's links in place: jars/ links every jar of the classpath but slf4j-simple, once."""
  lib = tmp_path / 'lib'
  lib.mkdir()
  for name in ('spark-core_2.12-3.2.2.jar', 'beam-runners-spark-3-2.62.0.jar', 'slf4j-simple-1.7.30.jar'):
    (lib / name).write_bytes(b'PK')
  home = str(tmp_path / 'spark_home')
  for _ in range(2):
    sc.make_spark_home(home, str(lib))
    jars = sorted(os.listdir(os.path.join(home, 'jars')))
    assert jars == ['beam-runners-spark-3-2.62.0.jar', 'spark-core_2.12-3.2.2.jar'], jars
    assert all(os.path.realpath(os.path.join(home, 'jars', j)) == str(lib / j) for j in jars)


@pytest.mark.slow
@pytest.mark.skipif(bool(fc.unavailable()), reason=fc.unavailable() or '')
@pytest.mark.timeout(300)
def test_the_service_prints_its_flags_and_stops_everything_on_sigterm(tmp_path):
  """With --kafka_io (where `make kafka-io` ran) it also runs a KafkaIO expansion service and
  prints a second line, the Kafka reader's flags."""
  workdir = str(tmp_path / 'cluster')
  kafka = not kafka_io.unavailable()
  command = [
    sys.executable,
    '-m',
    'beam_dl.services.flink_cluster',
    '--taskmanagers',
    '2',
    '--slots',
    '1',
    '--workdir',
    workdir,
    *(['--kafka_io'] if kafka else []),
  ]
  stderr = open(tmp_path / 'service.log', 'wb')  # pylint: disable=consider-using-with
  process = subprocess.Popen(
    command, env=services.cluster_env(), cwd=rm.REPO, stdout=subprocess.PIPE, stderr=stderr, text=True
  )
  try:
    line = process.stdout.readline()
    flags = shlex.split(line)
    assert flags[0] == '--runner=FlinkRunner' and '--environment_type=PROCESS' in flags, line
    master = next(f.split('=', 1)[1] for f in flags if f.startswith('--flink_master='))
    assert master.startswith('127.0.0.1:')
    assert http_json(int(master.split(':')[1]), '/taskmanagers')['taskmanagers'].__len__() == 2
    expansion = []
    if kafka:
      kafka_flags = shlex.split(process.stdout.readline())
      assert kafka_flags[0] == '--kafka_reader=xlang', kafka_flags
      expansion = [int(kafka_flags[1].rsplit(':', 1)[1])]
    tagged = [
      pid
      for pid in processes_tagged('')
      if workdir in _cmdline(pid) or any(f'ExpansionService {port}' in _cmdline(pid) for port in expansion)
    ]
    # JobManager, 2 TaskManagers, job server (and the expansion service)
    assert len(tagged) == 4 + len(expansion), [_cmdline(p)[:200] for p in tagged]
    # By default nothing listens beyond this machine, but the two ports Beam's job server cannot bind
    # otherwise (and the expansion service's, which Beam binds on all interfaces too).
    listening = listening_sockets(tagged)
    exposed = {port for _, address, port in listening if not is_loopback(address)}
    assert exposed == _beam_wildcard_ports(os.path.join(workdir, 'job_server.log')) | set(expansion), listening
    assert int(next(f for f in flags if f.startswith('--job_endpoint=')).rsplit(':', 1)[1]) in exposed
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    assert not [pid for pid in tagged if os.path.exists(f'/proc/{pid}') and _cmdline(pid)], 'JVMs outlived the service'
  finally:
    if process.poll() is None:  # a failed assertion: SIGTERM stops its JVMs too (SIGKILL would orphan them)
      process.send_signal(signal.SIGTERM)
      try:
        process.wait(60)
      except subprocess.TimeoutExpired:
        process.kill()


@pytest.mark.timeout(120)
def test_bad_flags_fail_with_one_line_and_exit_code_2():
  result = subprocess.run(
    [sys.executable, '-m', 'beam_dl.services.flink_cluster', '--taskmanagers', '0'],
    env=services.cluster_env(),
    cwd=rm.REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and '--taskmanagers' in result.stderr, result.stderr


@pytest.fixture(scope='class')
def cluster(tmp_path_factory):
  # With Beam's KafkaIO on it (when `make kafka-io` has run) for the streaming job.
  kafka = not kafka_io.unavailable()
  with services.flink_cluster(str(tmp_path_factory.mktemp('flink_cluster')), with_kafka_io=kafka) as c:
    yield c


@pytest.fixture(scope='module')
def many_images(data_dir, tmp_path_factory):
  """COPIES copies of each test image (names `cK_<name>`), so a job's Python work lasts seconds."""
  root = tmp_path_factory.mktemp('many_images')
  images = os.path.join(data_dir, 'images')
  os.makedirs(root / 'images')
  for name in os.listdir(images):
    with open(os.path.join(images, name), 'rb') as f:
      data = f.read()
    for k in range(COPIES):
      (root / 'images' / f'c{k}_{name}').write_bytes(data)
  os.symlink(os.path.join(data_dir, 'model'), root / 'model')
  return str(root)


COPIES = 100


def _assert_every_copy_once_as_direct(out_dir: str, many_images: str, reference) -> None:
  """Each of many_images' inputs is in exactly one output record, each set of copies gives what
  the originals gave on the DirectRunner, and no temporary folder is left."""
  counts = _records_per_input(out_dir)
  inputs = sorted(os.listdir(os.path.join(many_images, 'images')))
  assert sorted(counts) == inputs and set(counts.values()) == {1}, {f: n for f, n in counts.items() if n != 1}
  got = rm.PIPELINES[PIPELINE].read(out_dir)
  for k in range(COPIES):
    copy = f'c{k}_'
    rm.PIPELINES[PIPELINE].compare(
      {
        'predictions': {n[len(copy) :]: r for n, r in got['predictions'].items() if n.startswith(copy)},
        'failed': sorted((f[len(copy) :], *rest) for f, *rest in got['failed'] if f.startswith(copy)),
      },
      reference,
    )
  assert not glob.glob(os.path.join(out_dir, 'beam-temp-*')), os.listdir(out_dir)


def _model_loaded(many_images: str) -> str:
  """The serving handler's log line when a Python worker loads many_images' model: the inference
  stage's first bundle has begun, its elements on their way."""
  return f'loaded {os.path.join(many_images, "model")} '


def _await_line(read_log, line: str, seen_before: int, job: subprocess.Popen, where: str) -> None:
  """Waits (up to 300 s) until the text read_log() returns holds `line` more than seen_before
  times, the job still running."""
  deadline = time.monotonic() + 300
  while read_log().count(line) == seen_before:
    assert job.poll() is None, f'the job ended before {line!r} {where}'
    assert time.monotonic() < deadline, f'no {line!r} {where}'
    time.sleep(0.02)


def _newest_python_worker(member_tag: str) -> int:
  """The pid of the Python SDK worker started last among a member's processes."""
  workers = [p for p in processes_tagged(member_tag) if 'sdk_worker_main' in _cmdline(p)]
  assert workers, f'no Python worker under {member_tag}'
  return max(workers, key=_start_ticks)


class TestFlinkCluster:
  """One Flink cluster (stopped before any other starts). Jobs at parallelism 2, each with a fault:
  each input exactly once, the outputs equal Direct's."""

  @pytest.mark.slow
  @pytest.mark.skipif(bool(fc.unavailable()), reason=fc.unavailable() or '')
  @pytest.mark.timeout(600)
  def test_a_taskmanager_killed_mid_job_loses_and_doubles_nothing(self, cluster, data_dir, reference, tmp_path):
    out_dir = str(tmp_path / 'out')
    victim = cluster.processes.tag('taskmanager-0')
    generation = cluster.processes.member('taskmanager-0').generation
    restarts = cluster.processes.member('taskmanager-0').restarts
    survivor_starts = _harness_starts(cluster, 1)
    job = _run(data_dir, out_dir, cluster.runner_flags)
    # Kill once the TaskManager runs Python workers for this job (its boot binary started one).
    deadline = time.monotonic() + 300
    while not any('sdk_worker_main' in _cmdline(p) for p in processes_tagged(victim)):
      assert job.poll() is None, 'the job ended before a worker ran on taskmanager-0'
      assert time.monotonic() < deadline, 'no Python worker on taskmanager-0'
      time.sleep(0.2)
    jvm = cluster.processes.member('taskmanager-0').process.pid
    # Mid-job, Beam's Fn API servers for the SDK workers listen in the TaskManagers on all interfaces too.
    _assert_loopback_only(cluster, fn_api_members=('taskmanager-0', 'taskmanager-1'))
    orphans = [p for p in processes_tagged(f'{victim}{generation}') if p != jvm]  # its boot binary, SDK workers
    cluster.kill_taskmanager(0)
    _finish(job, out_dir)

    counts = _records_per_input(out_dir)
    assert sorted(counts) == sorted(list(reference['predictions']) + [f for f, _, _ in reference['failed']])
    assert set(counts.values()) == {1}, {f: n for f, n in counts.items() if n != 1}
    rm.PIPELINES[PIPELINE].compare(rm.PIPELINES[PIPELINE].read(out_dir), reference)
    assert not glob.glob(os.path.join(out_dir, 'beam-temp-*')), os.listdir(out_dir)
    # Parallelism 2 over two one-slot TaskManagers: the other one ran Python workers for this job too.
    assert _harness_starts(cluster, 1) > survivor_starts
    # No jars shipped with the job (NoJarsToStage): a TaskManager downloads a staged classpath as blobs.
    with open(cluster.log_path('taskmanager-1')) as f:
      assert 'BlobClient - Downloading' not in f.read()
    # The supervisor ended what the killed TaskManager started and brought up a new one.
    assert orphans and not processes_tagged(f'{victim}{generation}')
    assert cluster.processes.member('taskmanager-0').restarts == restarts + 1
    deadline = time.monotonic() + 60
    while cluster.registered_taskmanagers() < 2 and time.monotonic() < deadline:
      time.sleep(0.5)
    assert cluster.registered_taskmanagers() >= 2
    # After a job and a restart: the cluster listens on loopback only, but Beam's job server's two ports.
    _assert_loopback_only(cluster)

  @pytest.mark.slow
  @pytest.mark.skipif(bool(fc.unavailable()), reason=fc.unavailable() or '')
  @pytest.mark.timeout(600)
  @pytest.mark.parametrize('moment', ['mid_bundle', pytest.param('before_its_data_channel', marks=pytest.mark.long)])
  def test_a_python_worker_killed_loses_and_doubles_nothing(self, cluster, many_images, reference, moment, tmp_path):
    """kill -9 of one SDK worker process, and every one of the 3,200 inputs is in exactly one output
    record. `mid_bundle`: while it runs the inference stage's bundle; the bundle fails at once and
    Flink reruns the task's region. `before_its_data_channel`: as it starts, after it connected to
    the TaskManager's control service but before its data channel; that costs Beam's fixed 3-minute
    data-channel timeout before the task fails (docs/clusters.md), so it is marked `long`."""
    out_dir = str(tmp_path / 'out')
    member = cluster.processes.tag('taskmanager-1')
    failovers_before = _log_count(cluster, 'jobmanager', 'switched from RUNNING to FAILED')
    if moment == 'mid_bundle':
      trigger = _model_loaded(many_images)
    else:  # a worker logs it when it unpickles a stage's DoFns, before it opens its data channel
      trigger = 'fixes in place'
    seen_before = _log_count(cluster, 'taskmanager-1', trigger)
    job = _run(many_images, out_dir, cluster.runner_flags)
    _await_line(lambda: _log_text(cluster, 'taskmanager-1'), trigger, seen_before, job, 'on taskmanager-1')
    os.kill(_newest_python_worker(member), signal.SIGKILL)  # the one that logged the line
    killed_at = time.monotonic()
    _finish(job, out_dir)
    print(f'job ended {time.monotonic() - killed_at:.1f} s after the kill')  # with -s: the recovery time

    assert _log_count(cluster, 'jobmanager', 'switched from RUNNING to FAILED') > failovers_before  # a task failed over
    _assert_every_copy_once_as_direct(out_dir, many_images, reference)

  @pytest.mark.slow
  @pytest.mark.skipif(bool(fc.unavailable()), reason=fc.unavailable() or '')
  @pytest.mark.timeout(600)
  @pytest.mark.parametrize('pipeline', MATRIX)
  def test_pipeline_equals_direct(self, cluster, pipeline, matrix_reference, tmp_path):
    _equals_direct_on(cluster, pipeline, matrix_reference, tmp_path)

  @pytest.mark.slow
  @pytest.mark.skipif(
    bool(fc.unavailable() or kafka_io.unavailable()), reason=str(fc.unavailable() or kafka_io.unavailable())
  )
  @pytest.mark.timeout(900)
  def test_a_streaming_kafka_job_survives_a_taskmanager_kill_and_moves_to_a_new_model_at_a_savepoint(
    self, cluster, broker, co2_lstm_dir, tmp_path
  ):
    """Kafka -> score_sequences -> Kafka, streaming on the cluster with a checkpoint each second,
    while events keep coming: kill -9 of a TaskManager (Flink restores the last checkpoint), then
    stop with a savepoint and start again from it with a new model. Every event is in its
    window's final pane (its last ON_TIME or LATE pane) or a dead letter; each final pane equals
    the batch pipeline's over the same events, with the model that ran when it fired; the windows
    open at the stop are completed by the restarted job, and no pane comes from both jobs. Panes
    since the last checkpoint are written again after the kill (at-least-once, docs/clusters.md)."""
    from benchmarks.bench_streaming_latency import _produce_steady
    from benchmarks.soak_streaming import FLUSH_KEY, final_panes
    from pipelines import score_sequences_demo as demo

    model_b = str(tmp_path / 'model_b')
    _, values = demo.load_series()
    demo.train_model(model_b, values[200:320], steps=5)
    topic, out = 'cluster-events', 'cluster-scores'
    broker.create_topic(topic, partitions=2)
    for name in (out, f'{out}-failed'):
      broker.create_topic(name)
    assert cluster.registered_taskmanagers() == 2
    stream = _SteadyStream(broker.bootstrap, topic, out)
    try:
      job_a = _submit_streaming(cluster, broker.bootstrap, topic, out, co2_lstm_dir, tmp_path / 'a.log')
      stream.start_sending()
      _wait(lambda: stream.finals_received_after(0), 300, 'the first final pane')
      _wait(lambda: _completed_checkpoints(cluster, job_a) >= 2, 120, 'two checkpoints')

      killed_at = time.time()
      cluster.kill_taskmanager(0)
      # Restored from the checkpoint: final panes again, for windows after the kill.
      _wait(
        lambda: any(r['window_start'] > killed_at for r in stream.finals_received_after(killed_at)),
        240,
        'final panes after the TaskManager kill',
      )
      recovered_s = time.time() - killed_at
      _wait(lambda: _completed_checkpoints(cluster, job_a) >= 1, 120, 'a checkpoint after the restore')

      stopping_at = time.time()
      savepoint = cluster.stop_with_savepoint(job_a)
      time.sleep(2)  # events keep coming while no job runs; Kafka holds them
      restarted_at = time.time()
      job_b = _submit_streaming(
        cluster, broker.bootstrap, topic, out, model_b, tmp_path / 'b.log', '--savepoint_path', savepoint
      )
      _wait(
        lambda: any(r['window_start'] > restarted_at for r in stream.finals_received_after(restarted_at)),
        300,
        'final panes of the job started from the savepoint',
      )
      stream.stop_sending()
      # Move the watermark past every window: events of a key of their own, for 3 windows.
      _produce_steady(stream.producer, topic, 10, 3 * WINDOW_S + 2, keys=1, key_prefix=FLUSH_KEY[:-1])
      events = [e for e in services.consume_all(broker.bootstrap, topic) if e['key'] != FLUSH_KEY]
      deadline = time.monotonic() + 120  # until every event is out (or time is up: the assert below)
      while _accounted(events, stream)['missing'] and time.monotonic() < deadline:
        time.sleep(1)
    finally:
      stream.close()
      for job in cluster.running_jobs():
        cluster.cancel_job(job)

    result = _accounted(events, stream)
    print(
      f'{len(events)} events; recovered {recovered_s:.1f} s after the kill; accounted {result}; '
      f'job {job_a} -> savepoint {savepoint} -> job {job_b}'
    )
    assert result['missing'] == 0, result
    assert not [r for _, r in stream.failed if r['stage'] != 'late'], 'only late events are dead letters here'
    # Each window's final pane: the batch pipeline's over the same events but those dead-lettered
    # as late, with model A if it came before the savepoint, model B after.
    late = {
      (f['key'], round(f['event_time'] * 1000))
      for _, f in stream.failed
      if f['stage'] == 'late' and f['key'] != FLUSH_KEY
    }
    on_time = [e for e in events if (e['key'], int(e['time'] * 1000)) not in late]
    assert len(events) - len(on_time) == len(late)
    batch = {
      'a': _batch_outputs(on_time, co2_lstm_dir, tmp_path, 'batch_a'),
      'b': _batch_outputs(on_time, model_b, tmp_path, 'batch_b'),
    }
    received = {(r['key'], r['window_start'], r['pane_index']): at for at, r in stream.scores}
    scored_by = collections.Counter()
    for r in final_panes([r for _, r in stream.scores]).values():
      model = 'a' if received[(r['key'], r['window_start'], r['pane_index'])] < restarted_at else 'b'
      scored_by[model] += 1
      assert r['outputs'] == pytest.approx(batch[model][(r['key'], r['window_start'])], abs=1e-5), (model, r)
    assert scored_by['a'] and scored_by['b'], scored_by
    # The windows open at the stop stayed open in the savepoint: the restarted job completed them.
    open_at_stop = {
      (e['key'], WINDOW_S * (e['time'] // WINDOW_S))
      for e in events
      if WINDOW_S * (e['time'] // WINDOW_S) < stopping_at < WINDOW_S * (e['time'] // WINDOW_S + 1)
    }
    # ... and the stop wrote nothing twice: no pane came from both jobs.
    copies = collections.defaultdict(list)
    for at, r in stream.scores:
      copies[(r['key'], r['window_start'], r['pane_index'])].append(at)
    assert not [where for where, ats in copies.items() if min(ats) < restarted_at < max(ats)]
    finals = final_panes([r for _, r in stream.scores])
    assert open_at_stop and all(
      received[(*where, finals[where]['pane_index'])] > restarted_at for where in open_at_stop
    ), {where: received[(*where, finals[where]['pane_index'])] - restarted_at for where in open_at_stop}
    assert not late & {
      (e['key'], int(e['time'] * 1000))
      for e in events
      if (e['key'], WINDOW_S * (e['time'] // WINDOW_S)) in open_at_stop
    }
    assert batch['a'] != batch['b']


@pytest.fixture(scope='class')
def spark(tmp_path_factory):
  with services.spark_cluster(str(tmp_path_factory.mktemp('spark_cluster'))) as c:
    yield c


def _executor_logs(cluster, i: int) -> str:
  """The stderr of every executor Worker i has run (where their Python workers log)."""
  text = ''
  for path in glob.glob(os.path.join(cluster.workdir, f'worker-{i}', 'app-*', '*', 'stderr')):
    with open(path, errors='replace') as f:
      text += f.read()
  return text


@pytest.mark.slow
@pytest.mark.skipif(bool(sc.unavailable()), reason=sc.unavailable() or '')
class TestSparkCluster:
  """One Spark cluster, started after the Flink cluster has stopped; one job with a fault, checked
  as the Flink one is."""

  @pytest.mark.timeout(600)
  def test_an_executor_killed_mid_job_loses_and_doubles_nothing(self, spark, data_dir, reference, tmp_path):
    out_dir = str(tmp_path / 'out')
    worker = spark.processes.tag('worker-0')
    survivor_starts = _executor_logs(spark, 1).count('Python sdk harness starting')
    job = _run(data_dir, out_dir, spark.runner_flags)
    # Kill worker-0's executor JVM once it runs Python workers for this job.
    deadline = time.monotonic() + 300
    while not any('sdk_worker_main' in _cmdline(p) for p in processes_tagged(worker)):
      assert job.poll() is None, 'the job ended before a worker ran under worker-0'
      assert time.monotonic() < deadline, 'no Python worker under worker-0'
      time.sleep(0.2)
    executors = [p for p in processes_tagged(worker) if 'CoarseGrainedExecutorBackend' in _cmdline(p)]
    assert len(executors) == 1, executors
    # Mid-job, Beam's Fn API servers for the SDK workers listen in the executors on all interfaces too.
    _assert_loopback_only(spark, fn_api_members=('worker-0', 'worker-1'))
    os.kill(executors[0], signal.SIGKILL)
    _finish(job, out_dir)

    counts = _records_per_input(out_dir)
    assert sorted(counts) == sorted(list(reference['predictions']) + [f for f, _, _ in reference['failed']])
    assert set(counts.values()) == {1}, {f: n for f, n in counts.items() if n != 1}
    rm.PIPELINES[PIPELINE].compare(rm.PIPELINES[PIPELINE].read(out_dir), reference)
    assert not glob.glob(os.path.join(out_dir, 'beam-temp-*')), os.listdir(out_dir)
    # Both Workers' executors ran Python workers for this job.
    assert _executor_logs(spark, 1).count('Python sdk harness starting') > survivor_starts
    # No jars shipped with the job (NoJarsToStage): an executor fetches a staged classpath into its work dir.
    assert not glob.glob(os.path.join(spark.workdir, 'worker-*', 'app-*', '*', '*.jar'))
    # After a job (the driver lives on in the job server): loopback only, but Beam's job server's two ports.
    _assert_loopback_only(spark)

  @pytest.mark.timeout(600)
  def test_a_python_worker_killed_mid_bundle_loses_and_doubles_nothing(self, spark, many_images, reference, tmp_path):
    """kill -9 of one SDK worker process while it runs the inference stage's task: the task is
    lost (in runs here the executor exited with it, and Spark started a new one and recomputed
    the shuffle output it held), Spark reruns it, and every one of the 3,200 inputs is in
    exactly one output record."""
    out_dir = str(tmp_path / 'out')
    lost_before = _log_count(spark, 'job_server', 'Lost task')
    trigger = _model_loaded(many_images)
    seen_before = _executor_logs(spark, 1).count(trigger)
    job = _run(many_images, out_dir, spark.runner_flags)
    _await_line(lambda: _executor_logs(spark, 1), trigger, seen_before, job, 'under worker-1')
    os.kill(_newest_python_worker(spark.processes.tag('worker-1')), signal.SIGKILL)
    _finish(job, out_dir)
    assert _log_count(spark, 'job_server', 'Lost task') > lost_before  # the kill cost Spark a task
    _assert_every_copy_once_as_direct(out_dir, many_images, reference)

  @pytest.mark.timeout(600)
  @pytest.mark.parametrize('pipeline', MATRIX)
  def test_pipeline_equals_direct(self, spark, pipeline, matrix_reference, tmp_path):
    _equals_direct_on(spark, pipeline, matrix_reference, tmp_path)


WINDOW_S = 2.0
RATE = 40.0  # events/s over STREAM_KEYS keys: ~10 events a window and key
STREAM_KEYS = 8
SEQ_LEN = 32  # holds a whole window of a key
# KafkaIO's create-time watermark moves to the wall clock while a partition looks idle, ahead of
# records still on their way: events up to this far behind it still join their window (a LATE
# pane) instead of being late (docs/streaming.md).
ALLOWED_LATENESS_S = 10.0


@pytest.fixture(scope='module')
def broker():
  from beam_dl.services.kafka import KafkaBroker

  with KafkaBroker() as b:
    yield b


def _completed_checkpoints(cluster, job_id: str) -> int:
  answer = http_json(cluster.rest_port, f'/jobs/{job_id}/checkpoints') or {}
  return answer.get('counts', {}).get('completed', 0)


def _wait(condition, timeout_s: float, what: str) -> None:
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f'{what}: not within {timeout_s:g} s'
    time.sleep(0.5)


class _SteadyStream:
  """Events sent steadily to `topic` from a thread (the soak benchmark's: key, time = now = the
  record time, value) until `stop_sending()`; and consumers collecting (receipt time, record) of
  `out` and `out`-failed until `close()`."""

  def __init__(self, bootstrap: str, topic: str, out: str):
    from confluent_kafka import Producer

    from benchmarks.bench_streaming_latency import _consume_scores

    self._bootstrap, self._topic = bootstrap, topic
    self.scores: list = []
    self.failed: list = []
    self._closed, self._sending = threading.Event(), threading.Event()
    self.producer = Producer({'bootstrap.servers': bootstrap, 'linger.ms': 1, 'log_level': 0})
    for name, into in ((out, self.scores), (f'{out}-failed', self.failed)):
      threading.Thread(target=_consume_scores, args=(bootstrap, name, self._closed, into), daemon=True).start()
    self._sender = threading.Thread(target=self._send, daemon=True)

  def _send(self):
    from benchmarks.bench_streaming_latency import _produce_steady

    while self._sending.is_set():
      _produce_steady(self.producer, self._topic, RATE, 1.0, STREAM_KEYS)

  def start_sending(self):
    self._sending.set()
    self._sender.start()

  def stop_sending(self):
    self._sending.clear()
    if self._sender.ident is not None:
      self._sender.join(30)

  def finals_received_after(self, t: float) -> list[dict]:
    return [r for at, r in list(self.scores) if at > t and r.get('pane') == 'ON_TIME']

  def close(self):
    self.stop_sending()
    self._closed.set()


def _accounted(events: list[dict], stream: _SteadyStream) -> dict:
  """The soak benchmark's accounting of `events` in the stream's outputs so far; a dead letter
  replayed after a restore counts once."""
  from benchmarks.soak_streaming import account

  sent = [(e['key'], e['time']) for e in events]
  failed = {json.dumps(r, sort_keys=True): r for _, r in list(stream.failed)}
  return account(sent, [r for _, r in list(stream.scores)], list(failed.values()), WINDOW_S)


def _batch_outputs(events: list[dict], model_dir: str, tmp_path, name: str) -> dict:
  """{(key, window_start): outputs} of the batch pipeline (DirectRunner) over `events`."""
  from benchmarks.bench_streaming_latency import scoring_flags
  from pipelines import score_sequences

  lines = tmp_path / f'{name}.jsonl'
  lines.write_text(''.join(json.dumps(e) + '\n' for e in events))
  out = str(tmp_path / name / 'scores')
  score_sequences.run(['--input', str(lines), '--output', out, *scoring_flags(model_dir, WINDOW_S, SEQ_LEN)])
  return {(r['key'], r['window_start']): r['outputs'] for r in read_jsonl(out + '-[0-9]*.jsonl')}


def _submit_streaming(cluster, bootstrap: str, topic: str, out: str, model_dir: str, log_path, *extra: str) -> str:
  """Submits score_sequences from Kafka `topic` to `out` on the cluster (the streaming benchmark's
  command; a checkpoint each second); returns the Flink job's id once the job runs. The job runs
  on without the launcher, which is then ended."""
  from benchmarks.bench_streaming_latency import pipeline_command

  before = set(cluster.running_jobs())
  flags = [
    *cluster.runner_flags,
    *cluster.source_flags,
    '--checkpointing_interval',
    '1000',
    '--allowed_lateness',
    f'{ALLOWED_LATENESS_S:g}',
    *extra,
  ]
  with open(log_path, 'wb') as log:
    launcher = subprocess.Popen(
      pipeline_command(bootstrap, topic, out, model_dir, flags, window_size=WINDOW_S, seq_len=SEQ_LEN),
      env=rm.subprocess_env(),
      cwd=rm.REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
  try:
    _wait(lambda: set(cluster.running_jobs()) - before or launcher.poll() is not None, 300, 'the job submitted')
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(launcher.pid, signal.SIGKILL)
  new = set(cluster.running_jobs()) - before
  assert new, f'the job never ran: {open(log_path, errors="replace").read()[-4000:]}'
  return new.pop()
