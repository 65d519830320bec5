"""The documentation's commands run as written.

Every fenced shell block of README.md and docs/*.md (a fence with no tag or
`sh`/`bash`/`shell`; sample output and file trees are tagged `text`) is
either run here or marked in the doc, on the line before its fence:

    <!-- docs-test: cloud -->        needs a cloud account (not run)
    <!-- docs-test: gpu -->          needs a GPU (not run)
    <!-- docs-test: service TEXT --> starts a service that runs until stopped:
                                     run until a line of its output holds TEXT,
                                     then stopped with SIGTERM; every process
                                     of its group must end
    <!-- docs-test: by test_x.py::name -->
                                     runs here only through that test (the
                                     test itself must exist)

A doc's blocks run in order (a later one may use what an earlier one made),
with bash, from a scratch directory that looks like a checkout
(the repository's folders linked in, `demo_out` holding what `make demo`
writes), so `out/`, `mlflow.db` and the like land there; `/tmp/` in a block
is the scratch directory's own `tmp/`, so runs never meet. `NOT_YET` lists
the blocks not run yet, each with why: a gap, listed so that it shows; a
block found in neither place fails.
"""

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
NOT_YET = {
  ('docs/library.md', '--model_dir M --quantize int8'): 'placeholders M, Q, C, W: a summary of docs/compression.md',
  ('docs/library.md', "--input 'imgs/*'"): 'placeholder inputs imgs/*, model; the second command needs Dataflow',
  ('docs/large_local_jobs.md', "'photos/*/*.jpg'"): 'placeholder inputs photos/*',
  ('docs/streaming.md', '--model_dir MODEL --output out/scores'): 'placeholders MODEL, events/*',
  ('docs/preprocessing.md', '--preprocess_kind sequences'): 'placeholder events/* with your field names',
  (
    'docs/streaming.md',
    'python -m beam_dl.services.kafka_io > /tmp/kafka_io.out &',
  ): 'needs a producer of the events; the same sequence runs in tests/test_kafka.py',
  ('docs/streaming.md', "pip install 'beam_dl[kafka]'"): 'your own Kafka and Flink cluster',
  ('docs/registry_and_hdfs.md', "--input 'hdfs://data/images/*.png'"): 'needs images on HDFS first',
  ('docs/operations.md', 'tensorboard --logdir'): 'tensorboard serves until stopped and prints nothing first',
  ('docs/compression.md', '--workdir /tmp/compress_pruned'): 'three trainings of the full digits config (minutes)',
}
# docs/runners.md's running example is `PIPELINE_FLAGS` on gs://; tests/test_runners.py runs these runners locally.
NOT_YET.update(
  {
    ('docs/runners.md', text): "PIPELINE_FLAGS is the doc's gs:// example"
    for text in (
      '# DirectRunner',
      'local_job_service_main --port 8099',
      'worker_pool_main --service_port=50000',
      '$PIPELINE_FLAGS \\\n    --runner=FlinkRunner --flink_master=[local] --environment_type',
      '--job-port=8099 --artifact-port=0',
      '--runner=SparkRunner --spark_master_url=local[2] --environment_type=LOOPBACK',
      '--spark-master-url=local[2] --job-port=8099',
      '--runner=PrismRunner',
    )
  }
)
NOT_YET[('docs/runners.md', "--input 'incoming/*.jsonl'")] = 'placeholders incoming/*, model'


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
  return {
    **os.environ,
    'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
    'PYTHONPATH': rm.REPO,
  }


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
  env = {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'], 'PYTHONPATH': rm.REPO}
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
