"""The documentation's commands run as written.

Every fenced shell block of README.md and docs/*.md (a fence with no tag or
`sh`/`bash`/`shell`; sample output and file trees are tagged `text`) is
either run here or marked in the doc, on the line before its fence:

    <!-- docs-test: cloud -->        needs a cloud account or infrastructure of
                                     your own: a cluster, Docker (not run)
    <!-- docs-test: gpu -->          needs a GPU (not run)
    <!-- docs-test: service TEXT --> starts a service that runs until stopped:
                                     run until a line of its output holds TEXT,
                                     then stopped with SIGTERM; every process
                                     of its group must end
    <!-- docs-test: by test_x.py::name -->
                                     runs here only through that test (the
                                     test itself must exist); docs/runners.md's
                                     blocks by the runner matrix must use the
                                     matrix's runner flags

A doc's blocks run in order (a later one may use what an earlier one made),
with bash, from a scratch directory that looks like a checkout
(the repository's folders linked in, `demo_out` holding what `make demo`
writes), so `out/`, `mlflow.db` and the like land there; `/tmp/` in a block
is the scratch directory's own `tmp/`, so runs never meet. `NOT_YET` lists
the blocks not run yet, each with why: a gap, listed so that it shows; a
block found in neither place fails.
"""

import fnmatch
import glob
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import runner_matrix as rm
from tests.conftest import TESTS_SET_XLA_FLAGS

DOCS = ['README.md', *sorted(os.path.relpath(p, rm.REPO) for p in glob.glob(os.path.join(rm.REPO, 'docs', '*.md')))]
FENCE = re.compile(r'^(?P<indent>[ ]*)```(?P<tag>[a-z]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$', re.M | re.S)
MARK = re.compile(r'<!--\s*docs-test:\s*(?P<mark>[^>]*?)\s*-->\s*$')
SHELL_TAGS = ('', 'sh', 'bash', 'shell')
LINKED = (
  'beam_dl',
  'pipelines',
  'transforms',
  'tests',
  'docs',
  'docker',
  'third_party',
  'benchmarks',
  'Makefile',
  'setup.py',
  'constraints.txt',
  'pytest.ini',
  '.cache',
  '.runners',
  '.venv',
)

# Blocks not run yet, each with why: (doc, a string of the block) -> reason.
NOT_YET: dict[tuple[str, str], str] = {}


class Block:
  """One fenced shell block of a doc: where it is, its text, its mark."""

  def __init__(self, doc: str, line: int, body: str, mark: str):
    self.doc, self.line, self.body, self.mark = doc, line, body, mark

  @property
  def id(self) -> str:
    return f'{self.doc}:{self.line}'

  def __repr__(self):
    return self.id


def shell_blocks() -> list[Block]:
  """Every fenced shell block of README.md and docs/*.md, with the mark on the line before it."""
  blocks = []
  for doc in DOCS:
    with open(os.path.join(rm.REPO, doc)) as f:
      text = f.read()
    for m in FENCE.finditer(text):
      if m.group('tag') not in SHELL_TAGS:
        continue
      before = text[: m.start()].rstrip('\n').rsplit('\n', 1)[-1]
      mark = MARK.search(before)
      indent = len(m.group('indent'))
      body = '\n'.join(line[indent:] for line in m.group('body').splitlines()) + '\n'
      blocks.append(Block(doc, text[: m.start()].count('\n') + 1, body, mark.group('mark') if mark else ''))
  return blocks


def find(doc: str, containing: str) -> Block:
  found = [b for b in shell_blocks() if b.doc == doc and containing in b.body]
  assert len(found) == 1, f'{len(found)} blocks of {doc} contain {containing!r}'
  return found[0]


def doc_block(containing: str) -> str:
  """The fenced code block of docs/runners.md that contains `containing`."""
  return find('docs/runners.md', containing).body


def _not_yet(block: Block) -> str | None:
  return next((why for (doc, text), why in NOT_YET.items() if doc == block.doc and text in block.body), None)


def _runs(block: Block) -> bool:
  return not (_not_yet(block) or block.mark in ('cloud', 'gpu') or block.mark.startswith('by '))


def test_every_shell_block_is_run_or_marked():
  blocks = shell_blocks()
  assert len(blocks) > 30  # the extraction finds the docs' blocks
  for b in blocks:
    assert b.mark in ('', 'cloud', 'gpu') or b.mark.startswith(('by ', 'service')), f'{b}: mark {b.mark!r}'
    if b.mark.startswith('by '):
      path, _, name = b.mark[3:].partition('::')
      with open(os.path.join(rm.REPO, 'tests', path)) as f:
        assert f'def {name}(' in f.read(), f'{b}: {b.mark} names no test'
  for (doc, text), why in NOT_YET.items():
    assert find(doc, text), why


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory):
  """A scratch directory shaped like a checkout, with `make demo`'s output in demo_out."""
  root = tmp_path_factory.mktemp('docs_sandbox')
  for name in LINKED:
    if os.path.exists(os.path.join(rm.REPO, name)):
      os.symlink(os.path.join(rm.REPO, name), root / name)
  done = subprocess.run(
    [sys.executable, '-m', 'pipelines.demo', '--workdir', str(root / 'demo_out')],
    cwd=root,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return root


def _env() -> dict:
  """The environment a user's shell would have: the venv's tools first, the
  repository importable, and none of the test-wide eight fake CPU devices
  (conftest's XLA_FLAGS): a doc command trains on the devices a user has."""
  env = {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'], 'PYTHONPATH': rm.REPO}
  if env.pop(TESTS_SET_XLA_FLAGS, None):
    env.pop('XLA_FLAGS', None)
  return env


def _wait_for_line(process, text: str, out, timeout_s: float) -> bool:
  """Reads the service's output (copied to `out`) until a line holds `text` (any line when empty).

  A reader thread hands the lines over: `select` on the pipe cannot see lines
  that a `readline` has already pulled into the file object's buffer."""
  lines: queue.Queue = queue.Queue()

  def read():
    for line in iter(process.stdout.readline, ''):
      lines.put(line)
    lines.put(None)  # end of output

  threading.Thread(target=read, daemon=True).start()
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      line = lines.get(timeout=1)
    except queue.Empty:
      continue
    if line is None:
      return False
    out.write(line)
    if text in line:
      return True
  return False


def _group_ends(pgid: int, timeout_s: float) -> bool:
  """Whether every process of the group has ended within timeout_s (the service stopped what it started)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return True
    time.sleep(0.2)
  return False


def run_in_sandbox(block: Block, root, timeout_s: float = 600) -> tuple[int, str]:
  """Runs the block with bash in `root` (its `/tmp/` there); a `service` block until its first line, then SIGTERM."""
  scratch = os.path.join(root, 'tmp')
  os.makedirs(scratch, exist_ok=True)
  script = block.body.replace('/tmp/', scratch + '/')
  log = os.path.join(root, f'{block.doc.replace("/", "_")}_{block.line}.log')
  with open(log, 'w') as out:
    service = block.mark.startswith('service')
    process = subprocess.Popen(
      ['bash', '-euo', 'pipefail', '-c', script],
      cwd=root,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT if service else out,
      text=True,
      start_new_session=True,
    )
    try:
      if block.mark.startswith('service'):
        ready = _wait_for_line(process, block.mark[len('service') :].strip(), out, timeout_s)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
        rc = 0 if ready and _group_ends(process.pid, 60) else 1
      else:
        try:
          out.write(process.communicate(timeout=timeout_s)[0])
          rc = process.returncode
        except subprocess.TimeoutExpired:
          out.write(f'\n[docs test] still running after {timeout_s:.0f}s: stopped\n')
          rc = 124
    finally:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
  with open(log) as f:
    return rc, f.read()


@pytest.mark.slow
@pytest.mark.parametrize('doc', [d for d in DOCS if any(_runs(b) for b in shell_blocks() if b.doc == d)])
def test_doc_commands_run_as_written(doc, sandbox):
  """The doc's blocks in order (a later block may use what an earlier one made), each with bash."""
  for block in [b for b in shell_blocks() if b.doc == doc and _runs(b)]:
    rc, log = run_in_sandbox(block, sandbox)
    assert rc == 0, f'{block}:\n{block.body}\n{log[-4000:]}'


# -- docs/runners.md: the Dataflow commands that need no account ----------------------------


def run_block(block: str, demo: str, log: str) -> subprocess.CompletedProcess:
  """Runs the block with bash from the repository root, `DEMO` set to `demo`
  (the block's own `DEMO=` line is the one thing replaced)."""
  script = re.sub(r'^DEMO=.*$', f'DEMO={demo}', block, count=1, flags=re.M)
  env = _env()
  with open(log, 'w') as out:
    done = subprocess.run(
      ['bash', '-euo', 'pipefail', '-c', script],
      cwd=rm.REPO,
      env=env,
      stdout=out,
      stderr=subprocess.STDOUT,
      timeout=300,
    )
  with open(log) as f:
    done.log = f.read()
  return done


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """A `make demo`-shaped folder: images/test/* and model/."""
  data = rm.prepared_data(str(tmp_path_factory.getbasetemp() / 'matrix_data'), 'classify_images')
  root = tmp_path_factory.mktemp('demo_out')
  os.makedirs(root / 'images')
  os.symlink(os.path.join(data, 'images'), root / 'images' / 'test')
  os.symlink(os.path.join(data, 'model'), root / 'model')
  return str(root)


@pytest.mark.slow
def test_dataflow_dry_run_command_builds_the_job(demo, tmp_path):
  done = run_block(doc_block('--dry_run=True'), demo, str(tmp_path / 'log'))
  assert done.returncode == 0, done.log[-3000:]


@pytest.mark.slow
def test_classic_template_command_writes_the_template(demo, tmp_path):
  egg_info = os.path.join(rm.REPO, 'beam_dl.egg-info')
  had_egg_info = os.path.exists(egg_info)
  try:
    done = run_block(doc_block('--template_location='), demo, str(tmp_path / 'log'))
  finally:
    if not had_egg_info:  # `setup.py sdist` leaves it next to setup.py
      shutil.rmtree(egg_info, ignore_errors=True)
  assert done.returncode == 0, done.log[-3000:]
  with open(os.path.join(demo, 'dataflow', 'template.json')) as f:
    job = json.load(f)
  (pool,) = job['environment']['workerPools']
  assert 'workflow.tar.gz' in {p['name'] for p in pool['packages']}  # --setup_file staged the project
  assert os.path.exists(os.path.join(demo, 'dataflow', 'staging', 'workflow.tar.gz'))


# The flags that pick a runner and its workers; the rest of a command is the pipeline's.
RUNNER_FLAGS = (
  '--runner',
  '--flink_master',
  '--spark_master_url',
  '--job_endpoint',
  '--environment_type',
  '--environment_config',
  '--prism_location',
  '--direct_num_workers',
  '--direct_running_mode',
)
# Values that name a place on the user's machine (the matrix has its own).
PLACE_FLAGS = ('--job_endpoint', '--environment_config', '--prism_location')
JAR_FLAGS = {'--flink_job_server_jar': 'flink', '--spark_job_server_jar': 'spark'}


def _commands(body: str) -> list[list[str]]:
  """The `python -m pipelines.*` commands of a block, as argv lists (continuations joined, comments dropped)."""
  import shlex

  text = body.replace('\\\n', ' ')
  return [
    shlex.split(line, comments=True) for line in text.splitlines() if line.strip().startswith('python -m pipelines.')
  ]


def _runner_flags(argv: list[str]) -> tuple[frozenset, dict]:
  """(runner flags with place values blanked, {kind: job-server jar}) of one command."""
  flags, jars = set(), {}
  for arg in argv:
    name, _, value = arg.partition('=')
    if name in JAR_FLAGS:
      jars[JAR_FLAGS[name]] = value
    elif name in RUNNER_FLAGS:
      flags.add((name, '' if name in PLACE_FLAGS else value))
  if not any(name == '--runner' for name, _ in flags):
    flags.add(('--runner', 'DirectRunner'))  # Beam's default
  return frozenset(flags), jars


def test_runner_blocks_run_by_the_matrix_use_its_flags():
  """Each command of docs/runners.md that the runner matrix stands for picks a
  runner exactly as one of the matrix's cells does (`--*_job_server_jar`, Beam
  starting the job server itself, stands for the matrix's `--job_endpoint`), and
  names the jar `make runners` builds."""
  services = {'job_endpoint': 'e', 'worker_pool': 'w', 'flink_job_server': 'f', 'spark_job_server': 's'}
  matrix = {name: _runner_flags(case.flags(services))[0] for name, case in rm.RUNNERS.items()}
  checked = 0
  for block in shell_blocks():
    if block.doc != 'docs/runners.md' or block.mark != 'by test_runners.py::test_pipeline_on_runner':
      continue
    commands = _commands(block.body)
    assert commands, f'{block}: no pipeline command'
    for argv in commands:
      flags, jars = _runner_flags(argv)
      for kind, jar in jars.items():
        assert fnmatch.fnmatch(os.path.basename(jar), rm.JOB_SERVER_JARS[kind]) and jar.startswith('.runners/'), jar
        flags |= {('--job_endpoint', '')}
      assert flags in matrix.values(), f'{block}: {sorted(flags)} is no cell of the matrix {sorted(matrix)}'
      checked += 1
  assert checked >= 9
