"""Every pipeline runs unchanged on every runner that executes here.

The matrix is tests/runner_matrix.py: PIPELINES x RUNNERS. Each cell runs
`python -m pipelines.X <flags> <runner flags>` in a fresh process, bounded by
a timeout, and compares its outputs, in canonical form, with the
DirectRunner's (same predictions, same dead letters). The DirectRunner's own
outputs are checked for correctness. Local runners: DirectRunner, the
FnApiRunner with 2 worker processes, the PortableRunner against Beam's local
job service (the Runner/Fn API that Flink and Spark job servers speak) with
LOOPBACK workers and with an EXTERNAL worker pool. FlinkRunner and
SparkRunner run where BEAM_FLINK_JOB_SERVER_JAR / BEAM_SPARK_JOB_SERVER_JAR
(or BEAM_*_JOB_ENDPOINT) is set, and are skipped with that reason otherwise.

Inputs (and a small trained model) are written once per session; the job
service, worker pool and job servers are started once, on first use, and
killed at the end. `-m 'not runner'` leaves the whole matrix out.
"""

from __future__ import annotations

import contextlib
import os

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from beam_dl.services.process import is_loopback
from tests import runner_matrix as rm

pytestmark = pytest.mark.runner


class _Session:
  """Per-session state: prepared inputs, started services, reference outputs."""

  def __init__(self, root: str, data_root: str):
    self.root = root
    self.data_root = data_root
    self.stack = contextlib.ExitStack()
    self.services: dict[str, str] = {}
    self.started: set[str] = set()
    self.references: dict[str, object] = {}

  def data_dir(self, pipeline: str) -> str:
    return rm.prepared_data(self.data_root, pipeline)

  def services_for(self, needs) -> dict[str, str]:
    """Starts each service on first use; every later cell shares it."""
    for name in rm.service_plan(needs):
      if name not in self.started:
        key, service = rm.start_service(name, self.root)
        self.services[key] = self.stack.enter_context(service)
        self.started.add(name)
    return self.services

  def run(self, pipeline: str, runner: str):
    """Runs one cell; returns its canonical outputs (asserting it succeeded)."""
    case, runner_case = rm.PIPELINES[pipeline], rm.RUNNERS[runner]
    out_dir = os.path.join(self.root, 'out', pipeline, runner)
    os.makedirs(out_dir)
    argv = case.argv(self.data_dir(pipeline), out_dir) + runner_case.flags(self.services_for(runner_case.needs))
    own_job_server = f'{runner}_job_server' in self.started
    engine = (
      rm.engine_sockets(runner, self.services.get(f'{runner}_job_server', ''), self.root) if own_job_server else None
    )
    with engine or contextlib.nullcontext() as bound:
      outcome = rm.run_pipeline(case.module, argv, os.path.join(out_dir, 'run.log'))
    print(f'{pipeline} on {runner}: {outcome.seconds:.1f} s')  # each cell's wall time, with -s or -rA
    assert outcome.returncode == 0, f'{pipeline} on {runner} exited {outcome.returncode}:\n{outcome.log[-4000:]}'
    if own_job_server:
      # The embedded Flink's BLOB server and REST endpoint, the local Spark driver's ports: on loopback only.
      assert bound and all(is_loopback(address) for address, _ in bound), bound
    # Each SDK worker process's start-up warnings are noise a user can't act on (cli._DropBeamNoise).
    assert 'Discarding unparseable args' not in outcome.log, outcome.log[-4000:]
    return case.read(out_dir)

  def reference(self, pipeline: str):
    if pipeline not in self.references:
      canonical = self.run(pipeline, rm.REFERENCE_RUNNER)
      rm.PIPELINES[pipeline].check(canonical)
      self.references[pipeline] = canonical
    return self.references[pipeline]


@pytest.fixture(scope='session')
def matrix(tmp_path_factory):
  data_root = str(tmp_path_factory.getbasetemp() / 'matrix_data')
  session = _Session(str(tmp_path_factory.mktemp('runner_matrix')), data_root)
  with session.stack:
    yield session


def _cells():
  for pipeline, case in rm.PIPELINES.items():
    for runner in rm.RUNNERS:
      marks = []
      if runner in case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail[runner], strict=True))
      if case.runners is not None and runner not in case.runners:
        marks.append(pytest.mark.skip(reason=case.runners_skip_reason))
      elif not rm.pipeline_exists(case.module):
        marks.append(pytest.mark.skip(reason=f'{case.module} is not in this tree'))
      elif (
        case.ci_runners is not None
        and runner not in case.ci_runners
        and rm.RUNNERS[runner].local
        and os.environ.get('BEAM_DL_QUICK_MATRIX')
      ):
        marks.append(pytest.mark.skip(reason=case.ci_skip_reason))
      yield pytest.param(pipeline, runner, id=f'{pipeline}-{runner}', marks=marks)


@pytest.mark.timeout(600)
@pytest.mark.parametrize('pipeline,runner', list(_cells()))
def test_pipeline_on_runner(matrix, pipeline, runner):
  reason = rm.RUNNERS[runner].unavailable()
  if reason:
    pytest.skip(reason)
  reference = matrix.reference(pipeline)  # checked for correctness on first use
  if runner == rm.REFERENCE_RUNNER:
    return
  rm.PIPELINES[pipeline].compare(matrix.run(pipeline, runner), reference)


def test_flink_spark_and_prism_come_from_make_runners_or_the_environment(monkeypatch, tmp_path):
  """The Flink/Spark cells run on the job-server jar `make runners` built (or
  the user's jar), shared through --job_endpoint, or on the user's endpoint;
  Prism on the built binary; without them they skip and say how to get them."""
  for var in ('JOB_ENDPOINT', 'MASTER', 'JOB_SERVER_JAR'):
    for kind in ('FLINK', 'SPARK'):
      monkeypatch.delenv(f'BEAM_{kind}_{var}', raising=False)
  monkeypatch.delenv('BEAM_PRISM_LOCATION', raising=False)
  monkeypatch.setattr(rm, 'RUNNERS_DIR', str(tmp_path))
  assert 'make runners' in rm.RUNNERS['flink'].unavailable()
  assert 'make runners' in rm.RUNNERS['prism'].unavailable()
  jar = tmp_path / 'beam-runners-flink-1.19-job-server-2.62.0.jar'
  jar.write_bytes(b'')
  (tmp_path / 'prism').write_bytes(b'')
  assert rm.RUNNERS['flink'].unavailable() is None and rm.job_server_jar('flink') == str(jar)
  assert rm.RUNNERS['prism'].unavailable() is None
  assert rm.service_plan(rm.RUNNERS['flink'].needs) == ['flink_job_server']
  assert rm.RUNNERS['flink'].flags({'flink_job_server': 'localhost:1234'}) == [
    '--runner=FlinkRunner',
    '--flink_master=[local]',
    '--job_endpoint=localhost:1234',
    '--environment_type=LOOPBACK',
  ]
  assert rm.job_server_command('flink', str(jar), 1234, '/w')[:5] == [
    'java',
    '-jar',
    str(jar),
    '--flink-master',
    '[local]',
  ]
  monkeypatch.setenv('BEAM_SPARK_JOB_SERVER_JAR', '/nonexistent/spark.jar')
  assert 'does not exist' in rm.RUNNERS['spark'].unavailable()
  monkeypatch.setenv('BEAM_SPARK_JOB_ENDPOINT', 'cluster:8099')
  monkeypatch.setenv('BEAM_SPARK_MASTER', 'spark://cluster:7077')
  assert rm.RUNNERS['spark'].unavailable() is None
  assert rm.service_plan(rm.RUNNERS['spark'].needs) == []
  assert rm.RUNNERS['spark'].flags({}) == [
    '--runner=SparkRunner',
    '--spark_master_url=spark://cluster:7077',
    '--job_endpoint=cluster:8099',
    '--environment_type=LOOPBACK',
  ]


def test_a_dead_worker_pool_fails_within_the_timeout(tmp_path):
  """A portable job whose worker pool is not there fails (or is killed at the
  timeout): it never hangs the suite, and never reports success."""
  (tmp_path / 'words.txt').write_text('to be or not to be\n')
  with rm.job_service(str(tmp_path)) as endpoint:
    outcome = rm.run_pipeline(
      'apache_beam.examples.wordcount',
      [
        f'--input={tmp_path}/words.txt',
        f'--output={tmp_path}/out',
        '--runner=PortableRunner',
        f'--job_endpoint={endpoint}',
        '--environment_type=EXTERNAL',
        f'--environment_config=localhost:{rm.free_port()}',
      ],
      str(tmp_path / 'run.log'),
      timeout_s=20,
    )
  assert outcome.returncode != 0


def test_every_beam_pipeline_is_in_the_matrix():
  """A module in pipelines/ with `build(pipeline, options)` is a Beam pipeline: it needs a matrix entry."""
  import importlib
  import inspect
  import pkgutil

  import pipelines

  beam_pipelines = set()
  for info in pkgutil.iter_modules(pipelines.__path__, prefix='pipelines.'):
    module = importlib.import_module(info.name)
    build = getattr(module, 'build', None)
    if callable(build) and list(inspect.signature(build).parameters)[:2] == ['pipeline', 'options']:
      beam_pipelines.add(info.name)
  assert 'pipelines.classify_images' in beam_pipelines
  registered = {case.module for case in rm.PIPELINES.values()}
  assert beam_pipelines <= registered, f'add to tests/runner_matrix.PIPELINES: {sorted(beam_pipelines - registered)}'


class _CountPerKeyFn(beam.DoFn):
  """(key, _) -> (key, how many of key's elements came before and with it), from user state."""

  SEEN = ReadModifyWriteStateSpec('seen', VarIntCoder())

  def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
    count = (seen.read() or 0) + 1
    seen.write(count)
    yield element[0], count


@pytest.mark.timeout(300)
def test_flink_workers_keep_user_state_in_the_cache_by_default(tmp_path, monkeypatch):
  """Beam leaves the SDK worker's state cache off on portable runners; the
  command line's default (`cli.default_state_cache`) turns it on, so a
  stateful step on Flink reads each key's state from the runner once, not
  once per element (the late-data gate at 1,000 events/s was 19,056 reads in
  30 s without it, a growing backlog), and the counts stay exact."""
  reason = rm.RUNNERS['flink'].unavailable()
  if reason:
    pytest.skip(reason)
  from apache_beam.runners.worker import sdk_worker

  from beam_dl import cli
  from pipelines.score_sequences import FlinkLatencyOptions

  reads = []
  remote_get = sdk_worker.GlobalCachingStateHandler._get_raw

  def counted(self, state_key, continuation_token):
    reads.append(state_key.bag_user_state.key)
    return remote_get(self, state_key, continuation_token)

  monkeypatch.setattr(sdk_worker.GlobalCachingStateHandler, '_get_raw', counted)
  keys, per_key = 4, 100
  with rm.job_server('flink', str(tmp_path)) as endpoint:
    flags = rm.RUNNERS['flink'].flags({'flink_job_server': endpoint})
    options = cli.parse_options(
      [*flags, '--streaming', '--max_bundle_size=10'], (FlinkLatencyOptions,), prog='t', description=''
    )
    with beam.Pipeline(options=options) as p:
      counts = (
        p
        | beam.Create([(f'k{i % keys}', i) for i in range(keys * per_key)])
        | beam.Reshuffle()
        | beam.ParDo(_CountPerKeyFn())
        | beam.CombinePerKey(max)
      )
      assert_that(counts, equal_to([(f'k{i}', per_key) for i in range(keys)]))
  assert 0 < len(reads) <= 2 * keys, f'{len(reads)} state reads for {keys} keys: the state cache is off'
