"""The runner matrix: which pipelines run on which runners, and how.

Two registries, so that adding a pipeline or a runner is ONE entry:

  PIPELINES  name -> PipelineCase: how to write its small inputs (once per
             session), the argv that runs it (`python -m <module> ...`, no
             runner flags), how to read its outputs into a canonical,
             runner-independent form, and how to compare two of those
             (equal records; floats to the last written decimal).
  RUNNERS    name -> RunnerCase: the Beam flags that select the runner, the
             local services it needs (a portable job service, an EXTERNAL
             worker pool) and when it is unavailable (and why).

Every cell runs the pipeline module unchanged, as a user would
(`python -m pipelines.X <argv> <runner flags>`), in a fresh process bounded
by a timeout. Also here: building a pipeline's graph without running it, and
a fresh worker process that unpickles and runs DoFns. Shared by
tests/test_runners.py, test_portability.py, test_templates.py and
benchmarks/bench_runners.py; plain functions, no pytest in here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from beam_dl.formats.jsonl import read_jsonl
from beam_dl.services.flink_cluster import local_config_dir
from beam_dl.services.process import (
  free_port,
  listening_sockets,
  port_open,
  service_process,
  stop_process_group,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
RUN_TIMEOUT_S = 240


# ----------------------------------------------------------------- processes


def subprocess_env() -> dict[str, str]:
  """The environment for pipeline, job-service and worker-pool processes.

  The repository root is on PYTHONPATH (workers unpickle DoFns by module
  reference: `transforms.images._DecodeImageFn` must import there), and the
  virtualenv's bin/ is first on PATH: an EXTERNAL worker pool starts workers
  with a bare `python`, which must be this environment's.
  """
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH', '')) if p)
  env['PATH'] = os.pathsep.join((os.path.dirname(PYTHON), env.get('PATH', '')))
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # One CPU device per worker: the suite's 8 fake devices only slow workers.
  env['XLA_FLAGS'] = ''
  return env


@contextlib.contextmanager
def background_process(command: Sequence[str], port: int, log_path: str, timeout_s: float = 60) -> Iterator[int]:
  """Runs `command` (env and cwd of the project) until the block exits;
  yields `port` once it is served (`beam_dl.services.process.service_process`)."""
  with service_process(
    command,
    log_path=log_path,
    ready=lambda: port_open(port, 'localhost'),
    timeout_s=timeout_s,
    cwd=REPO,
    env=subprocess_env(),
  ):
    yield port


def background_service(args: Sequence[str], port: int, log_path: str) -> contextlib.AbstractContextManager[int]:
  """`python -m ...args` as a `background_process`."""
  return background_process([PYTHON, '-m', *args], port, log_path)


@contextlib.contextmanager
def job_service(log_dir: str) -> Iterator[str]:
  """Beam's local portable job service (Runner API), yields 'localhost:PORT'."""
  port = free_port()
  args = ['apache_beam.runners.portability.local_job_service_main', f'--port={port}']
  with background_service(args, port, os.path.join(log_dir, 'job_service.log')):
    yield f'localhost:{port}'


@contextlib.contextmanager
def worker_pool(log_dir: str) -> Iterator[str]:
  """An EXTERNAL SDK worker pool (what a Beam SDK container runs), yields 'localhost:PORT'."""
  port = free_port()
  args = ['apache_beam.runners.worker.worker_pool_main', f'--service_port={port}']
  with background_service(args, port, os.path.join(log_dir, 'worker_pool.log')):
    yield f'localhost:{port}'


@dataclasses.dataclass
class RunOutcome:
  returncode: int
  seconds: float
  log: str


def run_pipeline(module: str, argv: Sequence[str], log_path: str, timeout_s: float = RUN_TIMEOUT_S) -> RunOutcome:
  """`python -m module argv` in a fresh process group, bounded by timeout_s.

  A job whose workers died can wait forever on a portable runner, so a run
  past the timeout is killed with its process group and reported as such.
  """
  start = time.monotonic()
  with open(log_path, 'wb') as log:
    process = subprocess.Popen(
      [PYTHON, '-m', module, *argv],
      env=subprocess_env(),
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    try:
      returncode = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
      stop_process_group(process, grace_s=2)
      returncode = -9
  with open(log_path, errors='replace') as f:
    text = f.read()
  if returncode == -9:
    text += f'\n[runner_matrix] killed after {timeout_s} s\n'
  return RunOutcome(returncode, time.monotonic() - start, text)


# ------------------------------------------------------------------- runners


@dataclasses.dataclass(frozen=True)
class RunnerCase:
  """How to select one runner from the command line.

  Attributes:
    flags: (services) -> Beam flags; `services` maps 'job_endpoint' and
      'worker_pool' to the local services' addresses when `needs` asks.
    needs: local services to start first: 'job_service', 'worker_pool',
      'flink_job_server', 'spark_job_server'.
    unavailable: () -> None when the runner can run here, else the reason.
    local: True for runners that execute with the Python SDK alone; False
      for those that need Beam's jars or binary (`make runners`) or an
      endpoint, and are skipped with the reason `unavailable` gives without them.
  """

  flags: Callable[[Mapping[str, str]], list[str]]
  needs: tuple[str, ...] = ()
  unavailable: Callable[[], str | None] = lambda: None
  local: bool = True


# Beam's runners built by `make runners` (third_party/beam-runners/pom.xml, Go's prism).
RUNNERS_DIR = os.environ.get('BEAM_DL_RUNNERS_DIR', os.path.join(REPO, '.runners'))
JOB_SERVER_JARS = {'flink': '*flink*job-server*.jar', 'spark': '*spark*job-server*.jar'}
JOB_SERVER_START_S = 180  # a JVM starting Flink or Spark on 2 loaded cores


def job_server_jar(kind: str) -> str | None:
  """The Flink or Spark job-server jar: BEAM_<KIND>_JOB_SERVER_JAR, else the
  newest one `make runners` put in .runners/, else None."""
  jar = os.environ.get(f'BEAM_{kind.upper()}_JOB_SERVER_JAR')
  if jar:
    return jar
  found = sorted(glob.glob(os.path.join(RUNNERS_DIR, JOB_SERVER_JARS[kind])))
  return found[-1] if found else None


def prism_binary() -> str | None:
  """Beam's Prism runner: BEAM_PRISM_LOCATION, else .runners/prism, else None."""
  path = os.environ.get('BEAM_PRISM_LOCATION') or os.path.join(RUNNERS_DIR, 'prism')
  return path if os.path.exists(path) else None


def job_server_command(kind: str, jar: str, port: int, work_dir: str, master: str | None = None) -> list[str]:
  """The command Beam's FlinkRunner/SparkRunner run for their job server
  (`java -jar JAR` + the flags of flink_runner.py/spark_runner.py), on `port`.

  Artifact and expansion ports are 0 (any free port); staged artifacts go
  under work_dir. Spark on Java 17 needs the --add-opens Beam's SparkRunner
  adds; Spark reads `spark.*` JVM properties into its SparkConf.
  """
  java = ['java']
  if kind == 'flink':
    master_flags = ['--flink-master', master or '[local]']
    if not master:  # the embedded Flink's BLOB server, REST and RPC on 127.0.0.1 (`job_server` writes the dir)
      master_flags += ['--flink-conf-dir', os.path.join(work_dir, 'flink_conf')]
  else:
    from apache_beam.runners.portability.spark_runner import SPARK_JAR_JOB_SERVER_JVM_ARGS

    java += [*SPARK_JAR_JOB_SERVER_JVM_ARGS, '-Dspark.ui.enabled=false']  # no web UI on 0.0.0.0:4040
    if not master:  # local[2]'s driver RPC and block manager on 127.0.0.1, not the host's address
      java += ['-Dspark.driver.host=127.0.0.1', '-Dspark.driver.bindAddress=127.0.0.1']
    master_flags = ['--spark-master-url', master or 'local[2]']
  return [
    *java,
    '-jar',
    jar,
    *master_flags,
    '--artifacts-dir',
    os.path.join(work_dir, f'{kind}_artifacts'),
    '--job-port',
    str(port),
    '--artifact-port',
    '0',
    '--expansion-port',
    '0',
  ]


@contextlib.contextmanager
def job_server(kind: str, log_dir: str, jar: str | None = None, master: str | None = None) -> Iterator[str]:
  """Beam's Flink or Spark job server from its jar, until the block exits;
  yields 'localhost:PORT' for `--job_endpoint`.

  One job server serves many jobs: sharing it saves a JVM and Flink/Spark
  start per pipeline (what `--runner=FlinkRunner --flink_job_server_jar`
  does on every run). `master`: Flink's `[local]` / Spark's `local[2]` by
  default; a pipeline's own --flink_master / --spark_master_url wins.
  """
  jar = jar or job_server_jar(kind)
  if not jar or not os.path.exists(jar):
    raise FileNotFoundError(f'no {kind} job-server jar ({jar}): run `make runners`')
  port = free_port()
  command = job_server_command(kind, jar, port, log_dir, master)
  if kind == 'flink' and not master:
    local_config_dir(os.path.join(log_dir, 'flink_conf'))
  with background_process(command, port, os.path.join(log_dir, f'{kind}_job_server.log'), JOB_SERVER_START_S):
    yield f'localhost:{port}'


# The ports the embedded Flink of a job server announces in its log (its BLOB server, REST endpoint).
FLINK_PORTS = r'(?:Started BLOB server at|Rest endpoint listening at) \S+:(\d+)'


def _job_server_pids(port: int) -> list[int]:
  """Pids of this user's processes whose command line has `--job-port port`."""
  needle = f'--job-port\0{port}\0'.encode()
  pids = []
  for pid in (int(e) for e in os.listdir('/proc') if e.isdigit()):
    with contextlib.suppress(OSError):
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if needle in f.read():
          pids.append(pid)
  return pids


@contextlib.contextmanager
def engine_sockets(kind: str, endpoint: str, log_dir: str, every_s: float = 0.5) -> Iterator[list]:
  """While the block runs, samples the sockets the job server at endpoint listens on; at its
  end, fills the yielded list with (address, port) of those its embedded Flink announced in
  its log (BLOB server, REST endpoint), or, for Spark (whose log does not say), of those on
  a specific address (the local driver's RPC and block manager; Beam's own job, artifact
  and Fn API servers listen on the wildcard address whatever they are told)."""
  pids = _job_server_pids(int(endpoint.rsplit(':', 1)[1]))
  seen: set[tuple[str, int]] = set()
  stop = threading.Event()

  def sample():
    while not stop.wait(every_s):
      seen.update((address, port) for _, address, port in listening_sockets(pids))

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  found: list[tuple[str, int]] = []
  try:
    yield found
  finally:
    stop.set()
    thread.join()
    if kind == 'flink':
      with open(os.path.join(log_dir, f'{kind}_job_server.log'), errors='replace') as f:
        announced = {int(p) for p in re.findall(FLINK_PORTS, f.read())}
      found.extend(sorted(s for s in seen if s[1] in announced))
    else:
      found.extend(sorted(s for s in seen if s[0] not in ('::', '0.0.0.0')))


def _job_server_runner(kind: str) -> RunnerCase:
  """FlinkRunner (`--flink_master=[local]`) or SparkRunner (`local[2]`) on
  Beam's job server, LOOPBACK workers (in the submitting process, no container).

  The job server is the one `make runners` built (or BEAM_<KIND>_JOB_SERVER_JAR),
  started once per session and shared by every cell; BEAM_<KIND>_JOB_ENDPOINT
  points at a job server already running instead. BEAM_<KIND>_MASTER picks
  a cluster instead of the embedded Flink / local Spark.
  """
  upper = kind.upper()
  endpoint_var, master_var = f'BEAM_{upper}_JOB_ENDPOINT', f'BEAM_{upper}_MASTER'

  def flags(services):
    endpoint = os.environ.get(endpoint_var) or services[f'{kind}_job_server']
    master = os.environ.get(master_var)
    if kind == 'flink':
      master_flag = f'--flink_master={master or "[local]"}'
    else:
      master_flag = f'--spark_master_url={master or "local[2]"}'
    return [
      f'--runner={kind.capitalize()}Runner',
      master_flag,
      f'--job_endpoint={endpoint}',
      '--environment_type=LOOPBACK',
    ]

  def unavailable():
    if os.environ.get(endpoint_var):
      return None
    jar = job_server_jar(kind)
    if not jar:
      return (
        f"{kind.capitalize()}Runner needs Beam's {kind} job server: run `make runners` (builds "
        f'{RUNNERS_DIR}/{JOB_SERVER_JARS[kind]}), or set BEAM_{upper}_JOB_SERVER_JAR or {endpoint_var}'
      )
    if not os.path.exists(jar):
      return f'{jar} does not exist'
    return None

  return RunnerCase(flags=flags, needs=(f'{kind}_job_server',), unavailable=unavailable, local=False)


def _prism_unavailable() -> str | None:
  if prism_binary():
    return None
  return (
    f"PrismRunner needs Beam's prism binary: run `make runners` (builds {RUNNERS_DIR}/prism) or set BEAM_PRISM_LOCATION"
  )


RUNNERS: dict[str, RunnerCase] = {
  'direct': RunnerCase(lambda s: ['--runner=DirectRunner']),
  'fnapi_multiprocess': RunnerCase(
    lambda s: ['--runner=DirectRunner', '--direct_num_workers=2', '--direct_running_mode=multi_processing']
  ),
  'portable_loopback': RunnerCase(
    lambda s: ['--runner=PortableRunner', f'--job_endpoint={s["job_endpoint"]}', '--environment_type=LOOPBACK'],
    needs=('job_service',),
  ),
  'portable_external': RunnerCase(
    lambda s: [
      '--runner=PortableRunner',
      f'--job_endpoint={s["job_endpoint"]}',
      '--environment_type=EXTERNAL',
      f'--environment_config={s["worker_pool"]}',
    ],
    needs=('job_service', 'worker_pool'),
  ),
  'flink': _job_server_runner('flink'),
  'spark': _job_server_runner('spark'),
  'prism': RunnerCase(
    lambda s: ['--runner=PrismRunner', f'--prism_location={prism_binary()}', '--environment_type=LOOPBACK'],
    unavailable=_prism_unavailable,
    local=False,
  ),
}
REFERENCE_RUNNER = 'direct'


def service_plan(needs: Sequence[str]) -> list[str]:
  """The local services to start, in order, for a runner's `needs`.

  A worker pool needs the job service; a Flink/Spark job server is not
  started when BEAM_<KIND>_JOB_ENDPOINT names one already running.
  """
  plan = []
  if 'job_service' in needs or 'worker_pool' in needs:
    plan.append('job_service')
  if 'worker_pool' in needs:
    plan.append('worker_pool')
  for kind in ('flink', 'spark'):
    if f'{kind}_job_server' in needs and not os.environ.get(f'BEAM_{kind.upper()}_JOB_ENDPOINT'):
      plan.append(f'{kind}_job_server')
  return plan


def start_service(name: str, log_dir: str) -> tuple[str, contextlib.AbstractContextManager[str]]:
  """(key in the runners' `services` mapping, context manager yielding its address)."""
  if name == 'job_service':
    return 'job_endpoint', job_service(log_dir)
  if name == 'worker_pool':
    return 'worker_pool', worker_pool(log_dir)
  return name, job_server(name.split('_')[0], log_dir)


@contextlib.contextmanager
def services_for(needs: Sequence[str], log_dir: str) -> Iterator[dict[str, str]]:
  """Starts the local services in `needs`; yields their addresses."""
  with contextlib.ExitStack() as stack:
    services = {}
    for name in service_plan(needs):
      key, service = start_service(name, log_dir)
      services[key] = stack.enter_context(service)
    yield services


# ----------------------------------------------------------------- pipelines


@dataclasses.dataclass(frozen=True)
class PipelineCase:
  """One pipeline in the matrix.

  Attributes:
    module: run as `python -m module`.
    prepare: (data_dir) -> None; writes inputs (and a model) once per session.
    argv: (data_dir, out_dir) -> the pipeline's own flags (no runner flags).
    read: (out_dir) -> canonical outputs, equal across runners.
    check: (canonical) -> None; asserts the reference run is right in itself.
    compare: (canonical, reference) -> None; asserts a run matches the
      reference run (default: equal).
    xfail: runner name -> concrete reason, for cells known not to work.
    ci_runners: the local runners a quick run covers for this pipeline
      (None: all). Every cell runs by default (the full matrix fits CI's
      time); with BEAM_DL_QUICK_MATRIX=1 the others are skipped with
      `ci_skip_reason`.
    runners: the only runners this case runs on (None: all); the others are
      skipped with `runners_skip_reason`.
    template: the Flex Template metadata file in pipelines/templates/.
    template_optional: flag -> why: flags the pipeline requires only in some
      modes, so optional in the template.
    template_omit: flag -> why: pipeline flags the template leaves out.
  """

  module: str
  prepare: Callable[[str], None]
  argv: Callable[[str, str], list[str]]
  read: Callable[[str], Any]
  check: Callable[[Any], None] = lambda canonical: None
  compare: Callable[[Any, Any], None] = lambda canonical, reference: _assert_equal(canonical, reference)
  xfail: Mapping[str, str] = dataclasses.field(default_factory=dict)
  ci_runners: tuple[str, ...] | None = None
  ci_skip_reason: str = ''
  runners: tuple[str, ...] | None = None
  runners_skip_reason: str = ''
  template: str | None = None
  template_optional: Mapping[str, str] = dataclasses.field(default_factory=dict)
  template_omit: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _assert_equal(canonical: Any, reference: Any) -> None:
  assert canonical == reference


# classify_images: 30 real digit images (PNG and JPEG) + 2 broken files, a
# SmallCNN trained for 100 steps on 300 other digits.

CLASSIFY_IMAGES = 30
CLASSIFY_TRAIN = 300
CLASSIFY_STEPS = 100


def prepare_classify_images(data_dir: str) -> None:
  from pipelines import demo

  x_train, x_test, y_train, y_test = demo.digit_images(seed=0)
  train = demo.write_images(os.path.join(data_dir, 'train'), x_train[:CLASSIFY_TRAIN], y_train[:CLASSIFY_TRAIN])
  images = os.path.join(data_dir, 'images')
  demo.write_images(images, x_test[:CLASSIFY_IMAGES], y_test[:CLASSIFY_IMAGES])
  demo.write_broken_inputs(images)
  demo.train_model(train, os.path.join(data_dir, 'model'), steps=CLASSIFY_STEPS)


def classify_images_argv(data_dir: str, out_dir: str) -> list[str]:
  return [
    f'--input={os.path.join(data_dir, "images", "*")}',
    f'--model_dir={os.path.join(data_dir, "model")}',
    f'--output={os.path.join(out_dir, "predictions")}',
  ]


def read_classify_images(out_dir: str) -> dict:
  """{'predictions': {file: (label, scores)}, 'failed': sorted [(file, stage, reason)]}."""
  prefix = os.path.join(out_dir, 'predictions')
  predictions = {
    os.path.basename(r['key']): (r['label'], tuple(r['scores'])) for r in read_jsonl(prefix + '-[0-9]*.jsonl')
  }
  failed = sorted(
    (os.path.basename(r['key']) if r['key'] else None, r['stage'], r['reason'])
    for r in read_jsonl(prefix + '_failed-*.jsonl')
  )
  return {'predictions': predictions, 'failed': failed}


def check_classify_images(canonical: dict) -> None:
  predictions, failed = canonical['predictions'], canonical['failed']
  assert len(predictions) == CLASSIFY_IMAGES, sorted(predictions)
  assert [(f, stage) for f, stage, _ in failed] == [
    ('broken_not_an_image.jpg', 'decode'),
    ('broken_truncated.jpg', 'decode'),
  ], failed
  labelled = {f: int(f.split('_label')[1].split('.')[0]) for f in predictions}
  correct = sum(predictions[f][0] == y for f, y in labelled.items())
  # 100 steps on 300 digits: well above chance (10%) if the model ran.
  assert correct / len(labelled) > 0.5, (correct, len(labelled))


def compare_classify_images(canonical: dict, reference: dict) -> None:
  """Same files, labels and dead letters; scores equal to the 6 decimals written.

  One unit of the last written decimal is allowed: runners cut batches
  differently, and another padded batch shape may change XLA's last bits.
  """
  import numpy as np

  assert canonical['failed'] == reference['failed']
  assert sorted(canonical['predictions']) == sorted(reference['predictions'])
  for name, (label, scores) in reference['predictions'].items():
    got_label, got_scores = canonical['predictions'][name]
    assert got_label == label, (name, got_label, label)
    np.testing.assert_allclose(got_scores, scores, rtol=0, atol=2e-6, err_msg=name)


# score_sequences: the first 150 weekly Mauna Loa CO2 readings (statsmodels)
# as JSON-lines events with missing readings and 2 malformed lines; an LSTM
# forecaster trained for 100 steps; 12-week sliding windows.

SEQUENCE_EVENTS = 150
WEEK = 7 * 24 * 3600.0


def prepare_score_sequences(data_dir: str) -> None:
  from pipelines import score_sequences_demo as demo

  times, values = demo.load_series()
  with open(os.path.join(data_dir, 'events.jsonl'), 'w', encoding='utf-8') as f:
    for t, v in zip(times[:SEQUENCE_EVENTS], values[:SEQUENCE_EVENTS]):
      f.write(json.dumps({'key': demo.KEY, 'time': t, 'co2': None if v != v else round(float(v), 2)}) + '\n')
    f.write('{"key": "mauna_loa", "time": 1.0e9, "co2": 3\n')
    f.write('{"key": "mauna_loa", "ti\n')
  demo.train_model(os.path.join(data_dir, 'model'), values, steps=100)


def score_sequences_argv(data_dir: str, out_dir: str) -> list[str]:
  from pipelines import score_sequences_demo as demo

  return [
    f'--input={os.path.join(data_dir, "events.jsonl")}',
    f'--model_dir={os.path.join(data_dir, "model")}',
    f'--output={os.path.join(out_dir, "scores")}',
    '--event_value_fields=co2',
    '--window=sliding',
    f'--window_size={demo.SEQ_LEN * WEEK}',
    f'--window_period={WEEK}',
    f'--seq_len={demo.SEQ_LEN}',
    f'--min_length={demo.MIN_LENGTH}',
    '--forecast',
  ]


SCORE_FIELDS = ('outputs', 'prediction', 'target', 'score')


def read_score_sequences(out_dir: str) -> dict:
  """{'scores': {(key, window, pane): (length, last_time, numbers)}, 'failed': sorted [(key, stage, reason)]}.

  `latency_s` (wall clock at output) differs run to run and is left out.
  """
  prefix = os.path.join(out_dir, 'scores')
  scores = {}
  for r in read_jsonl(prefix + '-[0-9]*.jsonl'):
    numbers = []
    for field in SCORE_FIELDS:
      value = r.get(field)
      numbers.extend(value if isinstance(value, list) else [value])
    scores[(r['key'], r['window_start'], r['window_end'], r['pane'], r['pane_index'])] = (
      r['length'],
      r['last_time'],
      tuple(numbers),
    )
  failed = sorted((str(r.get('key')), r['stage'], r['reason']) for r in read_jsonl(prefix + '_failed-*.jsonl'))
  return {'scores': scores, 'failed': failed}


def check_score_sequences(canonical: dict) -> None:
  scores, failed = canonical['scores'], canonical['failed']
  assert len(scores) > 50, len(scores)
  assert sum(reason.startswith('bad JSON') for _, _, reason in failed) == 2, failed  # the 2 malformed lines
  assert {stage for _, stage, _ in failed} >= {'parse_event', 'sequence'}, failed  # + missing readings, short windows
  errors = [numbers[-1] for _, _, numbers in scores.values()]
  assert all(e is not None and e >= 0 for e in errors)


def _batch_pane(window: tuple) -> tuple:
  """A batch window's key with Flink's pane timing read as ON_TIME.

  In batch, each window fires once. Beam's Flink runner (batch translation)
  emits that pane as PaneInfo.NO_FIRING: first and last, index 0, timing
  UNKNOWN, where Direct, Spark and Prism say ON_TIME. Same pane, other label.
  """
  key, start, end, pane, index = window
  return (key, start, end, 'ON_TIME' if (pane, index) == ('UNKNOWN', 0) else pane, index)


def compare_score_sequences(canonical: dict, reference: dict) -> None:
  import numpy as np

  assert canonical['failed'] == reference['failed']
  scores = {_batch_pane(window): value for window, value in canonical['scores'].items()}
  assert sorted(scores) == sorted(reference['scores'])
  for window, (length, last_time, numbers) in reference['scores'].items():
    got_length, got_last, got_numbers = scores[window]
    assert (got_length, got_last) == (length, last_time), window
    np.testing.assert_allclose(
      np.array(got_numbers, float), np.array(numbers, float), rtol=1e-4, atol=1e-4, err_msg=str(window)
    )


# score_sequences in streaming mode: a bounded watched directory (2 files,
# 2 keys of 5 readings + a malformed line each, there before the job starts,
# watched for a few seconds), a score per event (EARLY panes) and a final
# ON_TIME pane per key. Streaming takes timestamps from the source (file read
# time), so window bounds and `last_time` follow the wall clock and are left
# out; one fixed window of 10^9 s holds every read time of this era.

STREAMING_SERIES = {'s1': [330.0, 331.0, 333.5, 332.0, 334.0], 's2': [350.0, 351.0, 349.0, 352.0, 353.0]}


def prepare_score_sequences_streaming(data_dir: str) -> None:
  prepared_data(os.path.dirname(data_dir), 'score_sequences')  # its model
  watched = os.path.join(data_dir, 'incoming')
  os.makedirs(watched)
  for i, (key, series) in enumerate(STREAMING_SERIES.items()):
    with open(os.path.join(watched, f'events{i}.jsonl'), 'w', encoding='utf-8') as f:
      for step, value in enumerate(series):
        f.write(json.dumps({'key': key, 'time': 1000.0 + step, 'co2': value}) + '\n')
      f.write('not json\n')


def score_sequences_streaming_argv(data_dir: str, out_dir: str) -> list[str]:
  return [
    '--streaming',
    f'--input={os.path.join(data_dir, "incoming", "*.jsonl")}',
    f'--model_dir={os.path.join(os.path.dirname(data_dir), "score_sequences", "model")}',
    f'--output={os.path.join(out_dir, "scores")}',
    '--event_value_fields=co2',
    '--window=fixed',
    '--window_size=1000000000',
    '--seq_len=8',
    '--forecast',
    '--stop_after_secs=4',
    '--poll_interval_secs=1',
    '--write_frequency_secs=2',
  ]


def read_score_sequences_streaming(out_dir: str) -> dict:
  """{'final': {key: (length, numbers)} of ON_TIME panes, 'panes': sorted pane kinds,
  'early': {key: sorted EARLY lengths}, 'failed': sorted [(key, stage, reason)],
  'short': the same for EARLY panes too short to score (stage 'sequence')}."""
  prefix = os.path.join(out_dir, 'scores')
  final, early, panes = {}, {}, set()
  for r in read_jsonl(prefix + '-[0-9]*.jsonl'):
    panes.add(r['pane'])
    numbers = []
    for field in SCORE_FIELDS:
      value = r.get(field)
      numbers.extend(value if isinstance(value, list) else [value])
    if r['pane'] == 'ON_TIME':
      assert r['key'] not in final, f'two ON_TIME panes for {r["key"]}'
      final[r['key']] = (r['length'], tuple(numbers))
    else:
      early.setdefault(r['key'], []).append(r['length'])
  failed, short = [], []
  for r in read_jsonl(prefix + '_failed-*.jsonl'):
    (short if r['stage'] == 'sequence' else failed).append((str(r.get('key')), r['stage'], r['reason']))
  return {
    'final': final,
    'panes': sorted(panes),
    'early': {k: sorted(v) for k, v in early.items()},
    'failed': sorted(failed),
    'short': sorted(short),
  }


def check_score_sequences_streaming(canonical: dict) -> None:
  """One final pane per key over all 5 readings; the 2 malformed lines dead-lettered."""
  assert sorted(canonical['final']) == sorted(STREAMING_SERIES), canonical['final']
  for key, series in STREAMING_SERIES.items():
    length, numbers = canonical['final'][key]
    assert length == len(series), (key, length)
    assert series[-1] in numbers, (key, numbers)  # the forecast target: the last reading
  assert set(canonical['panes']) <= {'EARLY', 'ON_TIME'}, canonical['panes']
  assert all(0 < n <= 5 for lengths in canonical['early'].values() for n in lengths), canonical['early']
  assert [stage for _, stage, _ in canonical['failed']] == ['parse_event', 'parse_event'], canonical['failed']
  # An EARLY pane of 1 event cannot be forecast (--forecast needs 2): a dead letter, never a score.
  assert all('has 1 event(s)' in reason for _, _, reason in canonical['short']), canonical['short']


def compare_score_sequences_streaming(canonical: dict, reference: dict) -> None:
  """Same final scores and dead letters. EARLY panes (and the dead letters of
  EARLY panes too short to score) are left out: which fire depends on how the
  runner bundles the input (see docs/runners.md)."""
  import numpy as np

  check_score_sequences_streaming(canonical)
  assert canonical['failed'] == reference['failed']
  for key, (length, numbers) in reference['final'].items():
    got_length, got_numbers = canonical['final'][key]
    assert got_length == length, key
    np.testing.assert_allclose(
      np.array(got_numbers, float), np.array(numbers, float), rtol=1e-4, atol=1e-4, err_msg=key
    )


# preprocess: tf.Transform over 30 real digit images + the 2 broken files.

PREPROCESS_IMAGES = 30


def prepare_preprocess(data_dir: str) -> None:
  from pipelines import demo

  x_train, _, y_train, _ = demo.digit_images(seed=0)
  images = os.path.join(data_dir, 'images')
  demo.write_images(images, x_train[:PREPROCESS_IMAGES], y_train[:PREPROCESS_IMAGES])
  demo.write_broken_inputs(images)


def preprocess_argv(data_dir: str, out_dir: str) -> list[str]:
  return [
    f'--input={os.path.join(data_dir, "images", "*")}',
    f'--transform_dir={os.path.join(out_dir, "transform")}',
    f'--output={os.path.join(out_dir, "train")}',
    '--preprocess_image_shape=8,8,1',
  ]


def read_preprocess(out_dir: str) -> dict:
  """{'records': {file: {feature: values}}, 'stats': {...}, 'failed': sorted [(file, stage, reason)]}."""

  from beam_dl.preprocessing import stats
  from beam_dl.training import input_pipeline

  transform_dir = os.path.join(out_dir, 'transform')
  records = input_pipeline.transformed_examples(transform_dir, os.path.join(out_dir, 'train') + '-*.tfrecord')
  return {
    'records': {os.path.basename(k): {n: _plain(v) for n, v in r.items()} for k, r in records.items()},
    'stats': stats.load(transform_dir),
    'failed': sorted(
      (os.path.basename(r['key'] or ''), r['stage'], r['reason'])
      for r in read_jsonl(os.path.join(out_dir, 'train') + '_failed-*.jsonl')
    ),
  }


def _plain(values) -> list:
  """A feature's values as a list of floats, or of str for bytes features."""
  import numpy as np

  flat = np.ravel(values)
  if flat.dtype.kind in 'SOU':
    return [x.decode('utf-8', 'replace') if isinstance(x, bytes) else str(x) for x in flat.tolist()]
  return [float(x) for x in flat]


def _assert_close(got, want, message: str) -> None:
  import numpy as np

  if want and all(isinstance(v, str) for v in want):
    assert got == want, message
  else:
    np.testing.assert_allclose(
      np.ravel(np.asarray(got, float)), np.ravel(np.asarray(want, float)), rtol=1e-5, atol=1e-5, err_msg=message
    )


def check_preprocess(canonical: dict) -> None:
  assert len(canonical['records']) == PREPROCESS_IMAGES, sorted(canonical['records'])
  assert [(f, stage) for f, stage, _ in canonical['failed']] == [
    ('broken_not_an_image.jpg', 'decode'),
    ('broken_truncated.jpg', 'decode'),
  ], canonical['failed']
  assert canonical['stats'], 'no analysed statistics'


def compare_preprocess(canonical: dict, reference: dict) -> None:
  assert canonical['failed'] == reference['failed']
  assert sorted(canonical['records']) == sorted(reference['records'])
  for name, features in reference['records'].items():
    assert sorted(canonical['records'][name]) == sorted(features), name
    for feature, values in features.items():
      _assert_close(canonical['records'][name][feature], values, f'{name} {feature}')
  assert sorted(canonical['stats']) == sorted(reference['stats'])
  for stat, value in reference['stats'].items():
    _assert_close(_plain(canonical['stats'][stat]), _plain(value), stat)


METRICS_TEMPLATE_OMIT = {
  name: 'a Prometheus endpoint or Pushgateway for local runs; Dataflow reports metrics to Cloud Monitoring'
  for name in (
    'metrics_port',
    'metrics_address',
    'metrics_poll_secs',
    'metrics_linger_secs',
    'metrics_pushgateway',
    'metrics_job',
  )
}


PIPELINES: dict[str, PipelineCase] = {
  'classify_images': PipelineCase(
    module='pipelines.classify_images',
    prepare=prepare_classify_images,
    argv=classify_images_argv,
    read=read_classify_images,
    check=check_classify_images,
    compare=compare_classify_images,
    template='classify_images.json',
    template_omit=METRICS_TEMPLATE_OMIT,
  ),
  'score_sequences': PipelineCase(
    module='pipelines.score_sequences',
    prepare=prepare_score_sequences,
    argv=score_sequences_argv,
    read=read_score_sequences,
    check=check_score_sequences,
    compare=compare_score_sequences,
    template='score_sequences.json',
    xfail={
      'prism': (
        'Prism v2.77.0 panics in batch mode: "assignment to entry in nil map" in '
        'aggregateStageKind.buildEventTimeBundle (engine/elementmanager.go:2107) at watermark +inf '
        '(a Prism bug; the streaming case runs on Prism)'
      )
    },
    ci_runners=('direct', 'portable_loopback', 'portable_external'),
    ci_skip_reason=(
      'BEAM_DL_QUICK_MATRIX=1: the multi-process FnApiRunner is covered by classify_images; unset it to run this cell'
    ),
    template_optional={'input': 'not needed when reading Pub/Sub or Kafka (--streaming)'},
    template_omit={
      'input_format': 'score_sequences reads JSON lines only and ignores it',
      **METRICS_TEMPLATE_OMIT,
      **{
        name: "Flink's bundle and checkpoint settings; Dataflow has its own"
        for name in ('max_bundle_size', 'max_bundle_time_mills', 'checkpointing_interval', 'auto_watermark_interval')
      },
    },
  ),
  'score_sequences_streaming': PipelineCase(
    module='pipelines.score_sequences',
    prepare=prepare_score_sequences_streaming,
    argv=score_sequences_streaming_argv,
    read=read_score_sequences_streaming,
    check=check_score_sequences_streaming,
    compare=compare_score_sequences_streaming,
    runners=('direct', 'flink', 'prism'),
    runners_skip_reason=(
      "streaming runs on Direct, Flink and Prism; Beam's local job service and the "
      "multi-process FnApiRunner are batch runners, and the portable Spark runner's "
      'streaming is limited (docs/runners.md)'
    ),
  ),
  'preprocess': PipelineCase(
    module='pipelines.preprocess',
    prepare=prepare_preprocess,
    argv=preprocess_argv,
    read=read_preprocess,
    check=check_preprocess,
    compare=compare_preprocess,
    template='preprocess.json',
    ci_runners=('direct', 'portable_external'),
    ci_skip_reason=(
      'BEAM_DL_QUICK_MATRIX=1: tf.Transform takes 25-55 s per runner on 2 cores, so a quick '
      'run covers Direct and the portable EXTERNAL worker pool; unset it for every runner'
    ),
  ),
}


def prepared_data(root: str, pipeline: str) -> str:
  """`root/<pipeline>` with the pipeline's inputs, prepared once and reused."""
  path = os.path.join(root, pipeline)
  done = os.path.join(path, '.prepared')
  if not os.path.exists(done):
    os.makedirs(path, exist_ok=True)
    PIPELINES[pipeline].prepare(path)
    open(done, 'w').close()
  return path


def pipeline_exists(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------ pipeline graphs

PROJECT_PACKAGES = ('beam_dl', 'transforms', 'pipelines')


def build_graph(pipeline: str, argv: Sequence[str]):
  """The pipeline's Beam graph, built (not run) from `argv` by its `build()`."""
  import importlib

  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  module = importlib.import_module(PIPELINES[pipeline].module)
  options = PipelineOptions(list(argv))
  graph = beam.Pipeline(options=options)
  module.build(graph, options)
  return graph


def applied_transforms(graph) -> list:
  """Every AppliedPTransform in `graph`, composites and leaves, in order."""
  import apache_beam as beam

  nodes = []

  class _Collect(beam.pipeline.PipelineVisitor):
    def visit_transform(self, node):
      nodes.append(node)

    def enter_composite_transform(self, node):
      if node.full_label:
        nodes.append(node)

  graph.visit(_Collect())
  return nodes


def graph_fns(graph) -> list[tuple[str, Any]]:
  """(label, DoFn or CombineFn) of every ParDo/Combine in `graph`."""
  return [
    (n.full_label, n.transform.fn) for n in applied_transforms(graph) if getattr(n.transform, 'fn', None) is not None
  ]


def is_project_object(obj: Any) -> bool:
  """Defined in beam_dl/transforms/pipelines: a class of ours, or Map(our function)."""
  wrapped = getattr(obj, '_fn', None)  # CallableWrapperDoFn around Map/FlatMap callables
  for candidate in (type(obj), wrapped):
    module = getattr(candidate, '__module__', '') or ''
    if module.split('.')[0] in PROJECT_PACKAGES:
      return True
  return False


# ----------------------------------------------------- a fresh worker process


def _pickler(library: str):
  from apache_beam.internal import cloudpickle_pickler, dill_pickler

  return {'cloudpickle': cloudpickle_pickler, 'dill': dill_pickler}[library]


def run_in_fresh_process(
  library: str,
  fns: Sequence[tuple[str, Any]],
  probes: Mapping[str, Sequence[Any]],
  handlers: Sequence[tuple[Any, Sequence[Any]]],
  work_dir: str,
  timeout_s: float = 180,
) -> dict:
  """Pickles `fns` and `handlers` with Beam's `library` pickler here, and in a
  new interpreter (as an SDK worker would) unpickles them, runs setup() and
  teardown() of every fn, feeds `probes[label]` to the fn as one bundle,
  and loads each handler's model and runs inference on its examples.

  Returns {'setup': [labels], 'outputs': {label: [(tag, value), ...] of one
  bundle of the probes (`run_bundle`)}, 'inference': [[outputs] per handler]}.
  """
  import pickle

  pickler = _pickler(library)
  request = {
    'library': library,
    'fns': [(label, pickler.dumps(fn)) for label, fn in fns],
    'probes': dict(probes),
    'handlers': [(pickler.dumps(handler), list(examples)) for handler, examples in handlers],
  }
  request_path, response_path = os.path.join(work_dir, 'request.pkl'), os.path.join(work_dir, 'response.pkl')
  with open(request_path, 'wb') as f:
    pickle.dump(request, f)
  code = f'from tests.runner_matrix import fresh_worker_main; fresh_worker_main({request_path!r}, {response_path!r})'
  done = subprocess.run(
    [PYTHON, '-c', code], env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout_s
  )
  assert done.returncode == 0, f'fresh worker failed:\n{done.stderr[-4000:]}'
  with open(response_path, 'rb') as f:
    return pickle.load(f)


def run_bundle(fn, elements: Sequence[Any]) -> list[tuple[Any, Any]]:
  """(tag, value) for every output of one bundle of `elements` through a set-up
  DoFn, in order: process() per element, then finish_bundle() (a DoFn that
  works ahead, like DecodeImages, emits its last outputs there). Windowed
  values are unwrapped; the main output's tag is None."""
  import inspect

  from apache_beam.transforms.window import GlobalWindow
  from apache_beam.utils.timestamp import MIN_TIMESTAMP
  from apache_beam.utils.windowed_value import WindowedValue

  def unwrap(value):
    return value.value if isinstance(value, WindowedValue) else value

  # What a runner passes for DoFn.WindowParam / TimestampParam / WindowedValueParam, in the global window.
  import apache_beam as beam

  params = inspect.signature(fn.process).parameters

  def context(element):
    values = {
      beam.DoFn.WindowParam: GlobalWindow(),
      beam.DoFn.TimestampParam: MIN_TIMESTAMP,
      beam.DoFn.WindowedValueParam: WindowedValue(element, MIN_TIMESTAMP, [GlobalWindow()]),
    }
    return {name: value for name, p in params.items() for param, value in values.items() if p.default == param}

  outputs = []
  fn.start_bundle()
  for element in elements:
    outputs.extend(fn.process(element, **context(element)) or ())
  outputs.extend(fn.finish_bundle() or ())
  tagged = []
  for out in outputs:
    out = unwrap(out)
    tagged.append((out.tag, unwrap(out.value)) if hasattr(out, 'tag') and hasattr(out, 'value') else (None, out))
  return tagged


def fresh_worker_main(request_path: str, response_path: str) -> None:
  """The worker side of `run_in_fresh_process` (nothing of ours imported yet)."""
  import pickle

  import apache_beam as beam
  import numpy as np

  with open(request_path, 'rb') as f:
    request = pickle.load(f)
  pickler = _pickler(request['library'])
  response = {'setup': [], 'outputs': {}, 'inference': []}
  for label, payload in request['fns']:
    fn = pickler.loads(payload)
    if isinstance(fn, beam.DoFn):
      fn.setup()
      if label in request['probes']:
        response['outputs'][label] = run_bundle(fn, request['probes'][label])
      fn.teardown()
    else:  # CombineFn
      fn.setup()
      fn.teardown()
    response['setup'].append(label)
  for payload, examples in request['handlers']:
    handler = pickler.loads(payload)
    model = handler.load_model()
    results = handler.run_inference(examples, model)
    response['inference'].append([np.asarray(r.inference) for r in results])
  with open(response_path, 'wb') as f:
    pickle.dump(response, f)
