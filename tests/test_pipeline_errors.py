"""Every `python -m pipelines.*` command refuses a user's mistake the same way:
one line `NAME: error: ...` on stderr, exit code 2, no traceback.

Each case is a real `python -m pipelines.X ...` process, as a user runs it;
the cases run in parallel threads (each mostly waits on its interpreter's
imports). stderr may also hold TensorFlow's C++ start-up lines, written by
its native logging before Python starts (`NATIVE_NOISE`); nothing else.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from beam_dl.models import checkpoints
from tests.models import save_seeded_model
from tests.runner_matrix import REPO, subprocess_env

pytestmark = pytest.mark.slow  # 22 processes of ~5 s of CPU each

NATIVE_NOISE = re.compile(
  r'^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR'
  r'|[IWE]\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\] .*)$'
)
IMAGE_SPEC = checkpoints.ModelSpec(
  name='small_cnn',
  kwargs={'num_classes': 10, 'features': [4, 8], 'hidden': 8},
  input_shape=(8, 8, 1),
  input_dtype='uint8',
  input_scale=1 / 255,
  labels=[str(d) for d in range(10)],
)
SEQUENCE_SPEC = checkpoints.ModelSpec(
  name='rnn',
  kwargs={'cell': 'gru', 'hidden_size': 4, 'pooling': 'last', 'num_outputs': 1, 'head': 'regression'},
  input_shape=(None, 1),
  input_dtype='float32',
  task='regression',
)


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _inputs(root) -> dict:
  """Real inputs and model directories, good and bad, under `root`."""
  from flax import serialization
  from PIL import Image

  images = root / 'images'
  images.mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 8), 60 * i, np.uint8), mode='L').save(images / f'digit_{i}_label{i}.png')
  not_images = root / 'not_images'
  not_images.mkdir()
  (not_images / 'notes.png').write_text('a text file, not a PNG\n')
  events = root / 'events.jsonl'
  events.write_text(''.join(json.dumps({'key': 'k', 'time': t, 'value': 1.0}) + '\n' for t in range(10)))
  model, variables = save_seeded_model(root / 'model', IMAGE_SPEC, fmt='msgpack')
  sequence_model, _ = save_seeded_model(root / 'sequence_model', SEQUENCE_SPEC, fmt='msgpack')
  # Arrays of strings where the kernel's numbers belong: msgpack restores them.
  strings = {
    **variables,
    'params': {
      **variables['params'],
      'Dense_0': {
        **variables['params']['Dense_0'],
        'kernel': [[str(x) for x in row] for row in np.asarray(variables['params']['Dense_0']['kernel']).tolist()],
      },
    },
  }
  object_dtype = root / 'object_dtype'
  object_dtype.mkdir()
  (object_dtype / checkpoints.SPEC_FILE).write_text(IMAGE_SPEC.to_json())
  (object_dtype / checkpoints.MSGPACK_FILE).write_bytes(serialization.msgpack_serialize(strings))
  deep = root / 'deep'
  deep.mkdir()
  spec = json.loads(IMAGE_SPEC.to_json())
  spec['extra'] = '@'
  nested = '{"a": ' + '[' * 50_000 + ']' * 50_000 + '}'
  (deep / checkpoints.SPEC_FILE).write_text(json.dumps(spec).replace('"@"', nested))
  (deep / checkpoints.MSGPACK_FILE).write_bytes((root / 'model' / checkpoints.MSGPACK_FILE).read_bytes())
  broken = root / 'broken'
  broken.mkdir()
  (broken / checkpoints.SPEC_FILE).write_text(IMAGE_SPEC.to_json())
  (broken / checkpoints.MSGPACK_FILE).write_bytes(b'\x00 not msgpack')
  a_file = root / 'a_file'
  a_file.write_text('in the way\n')
  return {
    'images': str(images / '*.png'),
    'not_images': str(not_images / '*'),
    'events': str(events),
    'model': model,
    'sequence_model': sequence_model,
    'object_dtype': str(object_dtype),
    'deep': str(deep),
    'broken': str(broken),
    'under_a_file': str(a_file / 'sub' / 'out'),
    'out': str(root / 'out' / 'pred'),
    'root': str(root),
  }


def _cases(d: dict) -> dict:
  """{case id: (module, argv, extra env, what the error line must say)}."""
  ci = ['--input', d['images'], '--output', d['out']]
  registry = {'MLFLOW_TRACKING_URI': f'sqlite:///{d["root"]}/mlflow.db'}
  unreachable = {
    'MLFLOW_TRACKING_URI': f'http://127.0.0.1:{_closed_port()}',
    'MLFLOW_HTTP_REQUEST_MAX_RETRIES': '0',
    'MLFLOW_HTTP_REQUEST_TIMEOUT': '5',
  }
  seq = ['--input', d['events'], '--output', d['out']]
  pre = ['--input', d['images'], '--output', d['out'], '--preprocess_kind', 'images']
  workdir = ['--workdir', d['under_a_file']]
  return {
    'classify_images-no-input': ('classify_images', ['--model_dir', d['model'], '--output', d['out']], {}, '--input'),
    'classify_images-empty-glob': (
      'classify_images',
      ['--input', d['root'] + '/none/*', '--model_dir', d['model'], '--output', d['out']],
      {},
      'matches no file',
    ),
    'classify_images-unknown-alias': (
      'classify_images',
      [*ci, '--model_dir', 'models:/digits@no_such_alias'],
      registry,
      'models:/digits@no_such_alias',
    ),
    'classify_images-registry-unreachable': (
      'classify_images',
      [*ci, '--model_dir', 'models:/digits@champion'],
      unreachable,
      'models:/digits@champion',
    ),
    'classify_images-object-dtype': (
      'classify_images',
      [*ci, '--model_dir', d['object_dtype']],
      {},
      "['params']['Dense_0']['kernel']",
    ),
    'classify_images-deep-spec': ('classify_images', [*ci, '--model_dir', d['deep']], {}, 'nested more than'),
    'classify_images-broken-variables': ('classify_images', [*ci, '--model_dir', d['broken']], {}, 'cannot decode'),
    'classify_images-output-under-a-file': (
      'classify_images',
      ['--input', d['images'], '--model_dir', d['model'], '--output', d['under_a_file']],
      {},
      '--output',
    ),
    'classify_images-bad-number': (
      'classify_images',
      [*ci, '--model_dir', d['model'], '--max_batch_size', '0'],
      {},
      'expected a positive integer',
    ),
    'classify_images-misspelled-flag': (
      'classify_images',
      [*ci, '--modle_dir', d['model']],
      {},
      'did you mean --model_dir',
    ),
    'score_sequences-image-model': (
      'score_sequences',
      [*seq, '--model_dir', d['model']],
      {},
      'does not take sequences',
    ),
    'score_sequences-zero-window': (
      'score_sequences',
      [*seq, '--model_dir', d['sequence_model'], '--window_size', '0'],
      {},
      'windows need size > 0',
    ),
    'preprocess-no-transform-dir': ('preprocess', pre, {}, '--transform_dir'),
    'preprocess-transform-dir-under-a-file': (
      'preprocess',
      [*pre, '--transform_dir', d['under_a_file']],
      {},
      '--transform_dir',
    ),
    'compress-no-calibration': (
      'compress',
      ['--model_dir', d['model'], '--output', d['root'] + '/int8'],
      {},
      'no calibration data',
    ),
    'compress-calibration-not-images': (
      'compress',
      ['--model_dir', d['model'], '--output', d['root'] + '/int8', '--calibration', d['not_images']],
      {},
      'no image file',
    ),
    'export_savedmodel-missing-model': (
      'export_savedmodel',
      ['--model_dir', d['root'] + '/nothing', '--export_dir', d['root'] + '/saved'],
      {},
      'not a beam_dl model',
    ),
    'demo-workdir-under-a-file': ('demo', workdir, {}, '--workdir'),
    'demo-misspelled-beam-flag': (
      'demo',
      ['--workdir', d['root'] + '/demo', '--runnner', 'DirectRunner'],
      {},
      'did you mean --runner',
    ),
    'score_sequences_demo-bad-cell': (
      'score_sequences_demo',
      ['--workdir', d['root'] + '/co2', '--cell', 'rnn'],
      {},
      'invalid choice',
    ),
    'train-missing-config': (
      'train',
      ['--config', d['root'] + '/none.py', '--workdir', d['root'] + '/t'],
      {},
      'config file not found',
    ),
    'train-bad-override': (
      'train',
      [
        '--config',
        'pipelines/configs/digits_cnn.py:runlocal',
        '--workdir',
        d['root'] + '/t',
        '--set',
        'num_steps=many',
      ],
      {},
      'num_steps takes',
    ),
  }


def _run(module: str, argv: list, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', f'pipelines.{module}', *argv],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**subprocess_env(), **env},
  )


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """{case id: (module, what the error must say, CompletedProcess)}, run four at a time."""
  cases = _cases(_inputs(tmp_path_factory.mktemp('errors')))
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {name: pool.submit(_run, module, argv, env) for name, (module, argv, env, _) in cases.items()}
    return {name: (cases[name][0], cases[name][3], future.result()) for name, future in futures.items()}


CASE_IDS = sorted(_cases(collections.defaultdict(str)))


def test_every_pipeline_has_error_cases():
  modules = {name.split('-')[0] for name in CASE_IDS}
  pipelines = {
    name[:-3] for name in os.listdir(os.path.join(REPO, 'pipelines')) if name.endswith('.py') and name != '__init__.py'
  }
  assert modules == pipelines


@pytest.mark.parametrize('case', CASE_IDS)
def test_a_user_error_is_one_line_and_exit_2(results, case):
  module, says, done = results[case]
  lines = [line for line in done.stderr.splitlines() if line.strip() and not NATIVE_NOISE.match(line)]
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert len(lines) == 1, done.stderr[-3000:]
  assert lines[0].startswith(f'{module}: error: ') and says in lines[0], lines[0]
  assert done.returncode == 2, done.stderr[-3000:]
