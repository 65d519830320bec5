"""The documentation's offline commands run as written.

docs/runners.md shows how to check a Dataflow job and write a classic template
without credentials or network. Those blocks are read from the doc itself and
run with bash from the repository root, only `DEMO` (where `make demo` wrote
its images and model) pointed at this test's copy of such data.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import runner_matrix as rm

DOC = os.path.join(rm.REPO, 'docs', 'runners.md')


def doc_block(containing: str) -> str:
  """The fenced code block of docs/runners.md that contains `containing`."""
  with open(DOC) as f:
    blocks = re.findall(r'^```\n(.*?)^```', f.read(), re.M | re.S)
  found = [b for b in blocks if containing in b]
  assert len(found) == 1, f'{len(found)} blocks of {DOC} contain {containing!r}'
  return found[0]


def run_block(block: str, demo: str, log: str) -> subprocess.CompletedProcess:
  """Runs the block with bash from the repository root, `DEMO` set to `demo`
  (the block's own `DEMO=` line is the one thing replaced)."""
  script = re.sub(r'^DEMO=.*$', f'DEMO={demo}', block, count=1, flags=re.M)
  env = {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
         'PYTHONPATH': rm.REPO}
  with open(log, 'w') as out:
    done = subprocess.run(['bash', '-euo', 'pipefail', '-c', script], cwd=rm.REPO, env=env,
                          stdout=out, stderr=subprocess.STDOUT, timeout=300)
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
  pool, = job['environment']['workerPools']
  assert 'workflow.tar.gz' in {p['name'] for p in pool['packages']}  # --setup_file staged the project
  assert os.path.exists(os.path.join(demo, 'dataflow', 'staging', 'workflow.tar.gz'))
