"""The flagship pipeline over real image bytes: predictions and dead letters."""

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_dl import cli
from beam_dl.decoding.images import ImageSpec, decode_image
from beam_dl.formats import image_example
from beam_dl.formats.jsonl import read_jsonl
from beam_dl.serving.handler import JaxModelHandler
from pipelines import classify_images
from tests.imaging import TEXT_NAMED_JPG, digits_uint8, encode, truncated_jpeg
from transforms import ClassifyImages

GRAY = ImageSpec(8, 8, channels=1)


@pytest.fixture(scope='module')
def inputs():
  """(key, bytes) of good images in several encodings and modes, and bad ones."""
  images, labels = digits_uint8()
  picks = images[-6:]
  rgba = np.dstack([np.stack([picks[3]] * 3, -1), np.full((8, 8), 255, np.uint8)])
  good = {
    'png_gray': encode(picks[0], 'PNG'),
    'jpeg_gray': encode(picks[1], 'JPEG', quality=95),
    'png_rgb': encode(np.stack([picks[2]] * 3, -1), 'PNG'),
    'png_rgba': encode(rgba, 'PNG'),
    'jpeg_rgb': encode(np.stack([picks[4]] * 3, -1), 'JPEG', quality=95),
    'bmp_gray': encode(picks[5], 'BMP'),
  }
  bad = {'truncated.jpg': truncated_jpeg(), 'text.jpg': TEXT_NAMED_JPG, 'empty.png': b''}
  return good, bad


def direct_labels(model_dir, good):
  """What the model says for each good input, computed without Beam."""
  handler = JaxModelHandler(model_dir)
  model = handler.load_model()
  keys = sorted(good)
  outputs = model.predict([decode_image(good[k], GRAY) for k in keys])
  return {k: int(np.argmax(o)) for k, o in zip(keys, outputs)}


@pytest.mark.parametrize(
  'dispatch_ahead', [True, False]
)  # records made in the inference step, or in Beam's Map after it
def test_classify_images_predictions_and_dead_letters(digits_model_dir, inputs, dispatch_ahead):
  good, bad = inputs
  expected = direct_labels(digits_model_dir, good)
  with TestPipeline() as p:
    outputs = (
      p
      | beam.Create(sorted({**good, **bad}.items()))
      | ClassifyImages(digits_model_dir, max_batch_size=4, dispatch_ahead=dispatch_ahead)
    )
    assert_that(
      outputs.predictions | 'KeyLabel' >> beam.Map(lambda r: (r['key'], r['label'])),
      equal_to(sorted(expected.items())),
      label='Predictions',
    )
    assert_that(
      outputs.predictions
      | 'ScoresValid'
      >> beam.Map(
        lambda r: (
          abs(sum(r['scores']) - 1) < 1e-4 and abs(r['score'] - max(r['scores'])) < 1e-5 and len(r['scores']) == 10
        )
      ),
      equal_to([True] * len(good)),
      label='Scores',
    )
    assert_that(
      outputs.failed | 'KeyStageKind' >> beam.Map(lambda r: (r['key'], r['stage'], r['reason'].split(' ')[0])),
      equal_to(
        [
          ('empty.png', 'decode', 'empty'),
          ('text.jpg', 'decode', 'not'),
          ('truncated.jpg', 'decode', 'corrupt'),
        ]
      ),
      label='DeadLetters',
    )


def test_pipeline_from_files_every_input_lands_once(digits_model_dir, inputs, tmp_path):
  good, bad = inputs
  for name, data in {**{f'{k}.img': v for k, v in good.items()}, **bad}.items():
    (tmp_path / 'in' / name).parent.mkdir(exist_ok=True)
    (tmp_path / 'in' / name).write_bytes(data)
  out = str(tmp_path / 'out' / 'pred')
  classify_images.run([f'--input={tmp_path}/in/*', f'--model_dir={digits_model_dir}', f'--output={out}'])
  predictions, failed = read_jsonl(out + '-[0-9]*.jsonl'), read_jsonl(out + '_failed-*.jsonl')
  keys = [r['key'] for r in predictions + failed]
  assert sorted(keys) == sorted(str(p) for p in (tmp_path / 'in').iterdir())  # all, once each
  assert {r['key'].rsplit('/', 1)[1] for r in failed} == set(bad)
  assert all(set(r) == {'key', 'label', 'score', 'scores', 'label_name'} for r in predictions)


def test_pipeline_from_tfrecord_examples(digits_model_dir, inputs, tmp_path):
  good, _ = inputs
  path = str(tmp_path / 'images.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    for key, data in sorted(good.items()):
      writer.write(image_example.encode_file_example(key, data))
    writer.write(b'not a protobuf at all \xff\xfe')  # a corrupt record
    writer.write(tf.train.Example().SerializeToString())  # an Example without the image
  out = str(tmp_path / 'pred')
  classify_images.run([f'--input={path}', f'--model_dir={digits_model_dir}', f'--output={out}'])
  predictions, failed = read_jsonl(out + '-[0-9]*.jsonl'), read_jsonl(out + '_failed-*.jsonl')
  assert {r['key']: r['label'] for r in predictions} == direct_labels(digits_model_dir, good)
  assert sorted(r['stage'] for r in failed) == ['parse', 'parse']
  assert any('image/encoded' in r['reason'] for r in failed)


def test_missing_options_fail_before_the_job_starts():
  with pytest.raises(ValueError, match='--input.*--model_dir.*--output'):
    classify_images.run([])


def test_trained_model_is_accurate_on_these_digits(digits_model_dir, inputs):
  """The shared test model is real: it recognises most clean digits."""
  _, labels = digits_uint8()
  good, _ = inputs
  predicted = direct_labels(digits_model_dir, good)
  truth = dict(zip(['png_gray', 'jpeg_gray', 'png_rgb', 'png_rgba', 'jpeg_rgb', 'bmp_gray'], labels[-6:]))
  assert sum(predicted[k] == truth[k] for k in truth) >= 5


@pytest.mark.parametrize('field, value', [('input_dtype', 'uint9'), ('labels', ['only one'])])
def test_bad_spec_fails_the_command_before_it_starts(digits_model_dir, tmp_path, field, value):
  """A model dir with a bad spec.json: exit status 2 and one line naming the
  file and the field; no job runs, no output is written."""
  import json
  import os
  import shutil
  import subprocess
  import sys

  model_dir = tmp_path / 'model'
  shutil.copytree(digits_model_dir, model_dir)
  spec = json.loads((model_dir / 'spec.json').read_text())
  spec[field] = value
  (model_dir / 'spec.json').write_text(json.dumps(spec))
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'a.png').write_bytes(b'not read')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([root, os.environ.get('PYTHONPATH', '')])}
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'pipelines.classify_images',
      f'--input={tmp_path}/in/*',
      f'--model_dir={model_dir}',
      f'--output={tmp_path}/out/pred',
    ],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 2
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(f'classify_images: error: {model_dir}/spec.json: field {field!r}')
  assert 'Traceback' not in done.stderr and not (tmp_path / 'out').exists()


def test_pipeline_reads_both_image_record_layouts_the_project_writes(digits_model_dir, inputs, tmp_path):
  """classify_images over TFRecords written by beam_dl's own encoders
  (`beam_dl.formats.image_example`): decoded pixels (`image/raw`, as
  WriteImageExamples and preprocess write them, at the file's own RGB decode
  and at the model's gray input) and encoded files (`image/encoded`). Every
  record's prediction equals the one for the same image read as a file."""
  good, _ = inputs
  files = tmp_path / 'files'
  files.mkdir()
  for name, data in good.items():
    (files / name).write_bytes(data)
  classify_images.run([f'--input={files}/*', f'--model_dir={digits_model_dir}', f'--output={tmp_path}/out/files'])
  from_files = {r['key'].rsplit('/', 1)[1]: r for r in read_jsonl(f'{tmp_path}/out/files-[0-9]*.jsonl')}
  assert sorted(from_files) == sorted(good)

  records = tmp_path / 'records'
  records.mkdir()
  with tf.io.TFRecordWriter(str(records / 'pixels.tfrecord')) as writer:
    for name, data in sorted(good.items()):
      writer.write(image_example.encode_image_example(f'rgb/{name}', decode_image(data, ImageSpec()), 1))
      writer.write(image_example.encode_image_example(f'gray/{name}', decode_image(data, GRAY)))
    writer.write(image_example.encode_image_example('cut', np.zeros((8, 8, 1), np.uint8))[:-30])
  with tf.io.TFRecordWriter(str(records / 'encoded.tfrecord')) as writer:
    for name, data in sorted(good.items()):
      writer.write(image_example.encode_file_example(f'encoded/{name}', data))
  classify_images.run(
    [f'--input={records}/*.tfrecord', f'--model_dir={digits_model_dir}', f'--output={tmp_path}/out/records']
  )
  predictions = read_jsonl(f'{tmp_path}/out/records-[0-9]*.jsonl')
  failed = read_jsonl(f'{tmp_path}/out/records_failed-*.jsonl')
  assert sorted(r['key'] for r in predictions) == sorted(
    f'{kind}/{name}' for kind in ('rgb', 'gray', 'encoded') for name in good
  )
  for record in predictions:
    want = from_files[record['key'].split('/', 1)[1]]
    assert record['label'] == want['label'], record['key']
    np.testing.assert_allclose(record['scores'], want['scores'], rtol=0, atol=1e-5, err_msg=record['key'])
  assert [(r['stage'], 'not a tf.train.Example' in r['reason']) for r in failed] == [('parse', True)]


def _write_inputs(folder, items):
  folder.mkdir()
  for name, data in items.items():
    (folder / name).write_bytes(data)


def test_max_error_rate_fails_a_mostly_corrupt_job_with_one_line(digits_model_dir, inputs, tmp_path, capsys):
  """3 of 4 inputs corrupt, --max_error_rate=0.5: the job fails, exit code 1,
  one line on stderr saying how many failed (Beam's threshold rule)."""
  good, bad = inputs
  _write_inputs(tmp_path / 'in', {'png_gray.png': good['png_gray'], **bad})
  argv = [
    f'--input={tmp_path}/in/*',
    f'--model_dir={digits_model_dir}',
    f'--output={tmp_path}/out/pred',
    '--max_error_rate=0.5',
  ]
  with pytest.raises(SystemExit) as exit_info:
    cli.main(classify_images.run, 'classify_images', argv)
  assert exit_info.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1] == ('classify_images: error: 3 of 4 inputs failed (75.0%), above the error threshold of 50.0%'), (
    lines
  )


def test_max_error_rate_under_the_threshold_succeeds_with_dead_letters(digits_model_dir, inputs, tmp_path):
  good, bad = inputs
  _write_inputs(tmp_path / 'in', {**{f'{k}.img': v for k, v in good.items()}, **bad})
  out = str(tmp_path / 'out' / 'pred')
  classify_images.run(
    [f'--input={tmp_path}/in/*', f'--model_dir={digits_model_dir}', f'--output={out}', '--max_error_rate=0.5']
  )  # 3 of 9 failed: 33% <= 50%
  failed = read_jsonl(out + '_failed-*.jsonl')
  assert sorted(r['key'].rsplit('/', 1)[1] for r in failed) == sorted(bad)
  assert len(read_jsonl(out + '-[0-9]*.jsonl')) == len(good)
