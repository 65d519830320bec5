"""A pipeline's main output is exactly what its documented glob `<output>-*`
matches: dead letters, drift reports and alerts are side outputs
`<output>_<name>-*` that the glob does not pick up."""

from __future__ import annotations

import glob
import json
import re

import numpy as np
import pytest

from beam_dl.formats.jsonl import read_jsonl
from beam_dl.models import checkpoints
from beam_dl.operations import drift
from tests.models import save_seeded_model

pytestmark = pytest.mark.slow  # two pipeline runs, ~20-40 s
MAIN_SHARD = re.compile(r'-\d{5}-of-\d{5}\.jsonl')


def _files(output: str, suffix: str = '') -> list[str]:
  return sorted(glob.glob(f'{glob.escape(output)}{suffix}-*'))


def _check(output: str, main_field: str, side_outputs: tuple[str, ...]) -> list[dict]:
  """The main output's records, after checking that `<output>-*` matches its
  shards only and that each side output was written beside it."""
  main = _files(output)
  assert main and all(MAIN_SHARD.fullmatch(path[len(output) :]) for path in main), main
  records = read_jsonl(f'{glob.escape(output)}-*')
  assert records and all(main_field in record for record in records)
  for name in side_outputs:
    assert _files(output, f'_{name}'), f'no {output}_{name}-* written'
    assert not set(_files(output, f'_{name}')) & set(main)
  return records


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  from PIL import Image

  root = tmp_path_factory.mktemp('side_outputs')
  (root / 'images').mkdir()
  for i in range(4):
    Image.fromarray(np.full((8, 8), 50 * i, np.uint8), mode='L').save(root / 'images' / f'digit_{i}.png')
  (root / 'images' / 'broken.png').write_text('not a PNG\n')  # a dead letter
  image_model, _ = save_seeded_model(
    root / 'image_model',
    checkpoints.ModelSpec(
      name='small_cnn',
      kwargs={'num_classes': 10, 'features': [4, 8], 'hidden': 8},
      input_shape=(8, 8, 1),
      input_dtype='uint8',
      input_scale=1 / 255,
      labels=[str(d) for d in range(10)],
    ),
    fmt='msgpack',
  )
  sequence_model, _ = save_seeded_model(
    root / 'sequence_model',
    checkpoints.ModelSpec(
      name='rnn',
      kwargs={'cell': 'gru', 'hidden_size': 4, 'pooling': 'last', 'num_outputs': 1, 'head': 'regression'},
      input_shape=(None, 1),
      input_dtype='float32',
      task='regression',
    ),
    fmt='msgpack',
  )
  events = root / 'events.jsonl'
  events.write_text(
    ''.join(json.dumps({'key': 'k', 'time': float(t), 'value': float(t % 7)}) + '\n' for t in range(40))
    + '{"key": "k", "ti\n'
  )  # one malformed line: a dead letter
  profile = drift.save_profile(
    drift.build_profile(
      {
        'image/brightness': np.linspace(0.0, 1.0, 50),
        'image/contrast': np.linspace(0.0, 0.5, 50),
        'value': np.linspace(0.0, 6.0, 50),
      }
    ),
    str(root / 'drift_profile.json'),
  )
  return {
    'root': root,
    'image_model': image_model,
    'sequence_model': sequence_model,
    'events': str(events),
    'profile': profile,
  }


def test_classify_images_side_outputs_stay_out_of_the_predictions_glob(inputs):
  from pipelines import classify_images

  output = str(inputs['root'] / 'classified' / 'predictions')
  classify_images.run(
    [
      '--input',
      str(inputs['root'] / 'images' / '*'),
      '--model_dir',
      inputs['image_model'],
      '--output',
      output,
      '--drift_profile',
      inputs['profile'],
      '--drift_min_count',
      '1',
      '--runner',
      'FnApiRunner',
    ]
  )
  assert len(_check(output, 'label', ('failed', 'drift', 'alerts'))) == 4
  assert len(read_jsonl(f'{glob.escape(output)}_failed-*')) == 1


def test_score_sequences_side_outputs_stay_out_of_the_scores_glob(inputs):
  from pipelines import score_sequences

  output = str(inputs['root'] / 'scored' / 'scores')
  score_sequences.run(
    [
      '--input',
      inputs['events'],
      '--model_dir',
      inputs['sequence_model'],
      '--output',
      output,
      '--window',
      'fixed',
      '--window_size',
      '10',
      '--seq_len',
      '8',
      '--forecast',
      '--drift_profile',
      inputs['profile'],
      '--drift_min_count',
      '1',
      '--runner',
      'FnApiRunner',
    ]
  )
  assert len(_check(output, 'score', ('failed', 'drift', 'alerts'))) == 4  # 4 windows of 10 events
  assert [r['stage'] for r in read_jsonl(f'{glob.escape(output)}_failed-*')] == ['parse_event']
