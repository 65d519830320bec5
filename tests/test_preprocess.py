"""tf.Transform preprocessing: analysers vs numpy, training records vs serving.

One preprocessing pipeline per kind (real digit images with two broken
files; JSON-lines events with bad lines), shared by the tests of that kind:
tf.Transform pipelines take ~15 s each on 2 cores.
"""

from __future__ import annotations

import collections
import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_dl.decoding.images import decode_image
from beam_dl.formats import image_example
from beam_dl.formats.jsonl import read_jsonl
from beam_dl.preprocessing import canonical, schemas
from beam_dl.preprocessing import stats as stats_lib
from beam_dl.training import input_pipeline
from beam_dl.training.config import DataConfig
from pipelines import demo, preprocess
from transforms import preprocessing as pp

NUM_IMAGES = 120


@pytest.fixture(scope='module')
def images_run(tmp_path_factory):
  """Preprocesses NUM_IMAGES real digit files (+2 broken) with z-score scaling."""
  root = tmp_path_factory.mktemp('images')
  x, _, y, _ = demo.digit_images()
  paths = demo.write_images(str(root / 'images'), x[:NUM_IMAGES], y[:NUM_IMAGES])
  demo.write_broken_inputs(str(root / 'images'))
  transform_dir, output = str(root / 'transform'), str(root / 'out' / 'train')
  _, analysed = preprocess.run(
    [
      f'--input={root}/images/*',
      f'--transform_dir={transform_dir}',
      f'--output={output}',
      '--preprocess_image_shape=8,8,1',
      '--runner=FnApiRunner',
    ]
  )
  pixels = {p: decode_image(open(p, 'rb').read(), canonical.image_spec_for((8, 8, 1))) for p in paths}
  return dict(root=root, paths=paths, transform_dir=transform_dir, output=output, analysed=analysed, pixels=pixels)


def test_image_dead_letters_and_outputs(images_run):
  failed = read_jsonl(images_run['output'] + '_failed-*.jsonl')
  assert sorted(os.path.basename(f['key']) for f in failed) == ['broken_not_an_image.jpg', 'broken_truncated.jpg']
  assert {f['stage'] for f in failed} == {'decode'}
  assert os.path.isdir(os.path.join(images_run['transform_dir'], 'transform_fn'))
  assert not os.path.exists(os.path.join(images_run['transform_dir'], 'tmp'))
  records = input_pipeline.transformed_examples(images_run['transform_dir'], images_run['output'] + '-*.tfrecord')
  assert sorted(records) == sorted(images_run['paths'])
  assert all(not name.startswith(stats_lib.PREFIX) for r in records.values() for name in r)


def test_image_analysers_match_numpy(images_run):
  all_pixels = np.stack(list(images_run['pixels'].values())).astype(np.float64)
  analysed = images_run['analysed']
  np.testing.assert_allclose(analysed['image/mean'], [all_pixels.mean()], rtol=1e-5)
  np.testing.assert_allclose(analysed['image/var'], [all_pixels.var()], rtol=1e-4)
  assert analysed['image/min'] == [all_pixels.min()] and analysed['image/max'] == [all_pixels.max()]
  assert stats_lib.load(images_run['transform_dir']) == analysed


def test_image_training_records_are_z_scores_with_labels(images_run):
  records = input_pipeline.transformed_examples(images_run['transform_dir'], images_run['output'] + '-*.tfrecord')
  mean, std = images_run['analysed']['image/mean'][0], np.sqrt(images_run['analysed']['image/var'][0])
  for path, pixels in images_run['pixels'].items():
    np.testing.assert_allclose(records[path]['image'], (pixels.reshape(-1) - mean) / std, rtol=1e-5, atol=1e-5)
    assert records[path]['label'] == canonical.label_from_name(path)
  # The trainer's input pipeline reads the same records (DataConfig kind 'transformed').
  cfg = DataConfig(kind='transformed', transform_dir=images_run['transform_dir'], features=('image',), shape=(8, 8, 1))
  (batch,) = input_pipeline.make_dataset(
    cfg, images_run['output'] + '-*.tfrecord', 1000, train=False
  ).as_numpy_iterator()
  assert batch['inputs'].shape == (NUM_IMAGES, 8, 8, 1) and batch['inputs'].dtype == np.float32
  np.testing.assert_array_equal(batch['inputs'], np.stack([r['image'].reshape(8, 8, 1) for r in records.values()]))
  np.testing.assert_array_equal(batch['label'], [r['label'] for r in records.values()])


def test_serving_pipeline_gives_the_training_features(images_run):
  """The same image file through the serving transform == its training record."""
  from beam_dl.preprocessing import tft_jax

  records = input_pipeline.transformed_examples(images_run['transform_dir'], images_run['output'] + '-*.tfrecord')
  expected = [(p, records[p]['image'].reshape(8, 8, 1)) for p in images_run['paths']]
  served = {}

  def matches(actual):
    served.update(dict(actual))
    assert sorted(served) == sorted(p for p, _ in expected)
    for path, image in expected:
      np.testing.assert_allclose(served[path], image, rtol=0, atol=1e-6)

  with TestPipeline(runner='FnApiRunner') as p:
    files = p | beam.Create([(path, open(path, 'rb').read()) for path in images_run['paths']])
    files = (files, p | 'Broken' >> beam.Create([('bad.png', b'not an image')])) | beam.Flatten()
    out = files | pp.TransformImagesForInference(images_run['transform_dir'], batch_size=32)
    assert_that(out.inputs, matches)
    assert_that(
      out.failed | beam.Map(lambda f: (f['key'], f['stage'])), equal_to([('bad.png', 'decode')]), label='Failed'
    )

  # The JAX equivalent from the analysed statistics, and the folded ModelSpec.
  raw = np.stack([images_run['pixels'][p] for p, _ in expected])
  want = np.stack([image for _, image in expected])
  np.testing.assert_allclose(np.asarray(tft_jax.image_fn(images_run['transform_dir'])(raw)), want, rtol=0, atol=1e-6)
  from beam_dl.models.checkpoints import ModelSpec

  spec = tft_jax.fold_into_spec(ModelSpec('small_cnn', input_shape=(8, 8, 1)), images_run['transform_dir'])
  np.testing.assert_allclose(np.asarray(spec.normalize(raw)), want, rtol=1e-5, atol=1e-5)


def test_apply_saved_transform_dead_letters_bad_records(images_run):
  good = image_example.encode_image_example('ok', images_run['pixels'][images_run['paths'][0]], 3)
  wrong_size = image_example.encode_image_example('small', np.zeros((4, 4, 1), np.uint8), 1)
  with TestPipeline(runner='FnApiRunner') as p:
    out = (
      p
      | beam.Create([('ok', good), ('small', wrong_size), ('junk', b'\x00junk')])
      | pp.ApplySavedTransform(images_run['transform_dir'])
    )
    assert_that(out.transformed | beam.Map(lambda kv: (kv[0], int(kv[1]['label']))), equal_to([('ok', 3)]))
    assert_that(
      out.failed | beam.Map(lambda f: (f['key'], f['stage'])),
      equal_to([('small', 'transform'), ('junk', 'transform')]),
      label='Failed',
    )


def test_canonical_image_records_accept_both_formats_and_reject_bad_ones():
  import io

  import tensorflow as tf
  from PIL import Image

  spec = canonical.image_spec_for((8, 8, 1))
  image = (np.arange(64, dtype=np.uint8) * 3).reshape(8, 8, 1)
  png = io.BytesIO()
  Image.fromarray(image[..., 0], mode='L').save(png, 'PNG')
  encoded = image_example.encode_file_example('k7', png.getvalue(), 7)
  decoded = image_example.encode_image_example('k7', image, 7)
  for record in (encoded, decoded):
    parsed = tf.io.parse_example(
      [canonical.image_record_to_raw(record, spec, 'fallback')], schemas.image_feature_spec()
    )
    assert parsed['key'].numpy()[0] == b'k7' and parsed['label'].numpy()[0] == 7
    assert np.array_equal(np.frombuffer(parsed['image/raw'].numpy()[0], np.uint8).reshape(8, 8, 1), image)
  bad = {
    'wrong shape': image_example.encode_image_example('k', np.zeros((4, 4, 1), np.uint8)),
    'not an example': b'\xff\x00garbage',
    'no image': tf.train.Example().SerializeToString(),
  }
  for _name, record in bad.items():
    with pytest.raises(canonical.CanonicalError):
      canonical.image_record_to_raw(record, spec, 'fallback')


# ------------------------------------------------------------------ sequences

ITEMS = ['apple', 'banana', 'cherry', 'date', 'elder', 'fig']


def write_events(path: str, seed: int = 0) -> dict:
  """JSON-lines events of 30 users (1-12 events each), plus 2 bad lines.

  Item frequencies are made distinct so the vocabulary order is unambiguous.
  Returns {user: [events in time order]}.
  """
  rng = np.random.default_rng(seed)
  users = {}
  lines = []
  weights = np.array([32, 16, 8, 4, 2, 1], float)
  for u in range(30):
    n = int(rng.integers(1, 13))
    times = np.sort(rng.choice(1000, n, replace=False)).astype(float)
    events = [
      {
        'user': f'u{u:02d}',
        'ts': t,
        'amount': float(np.round(rng.gamma(2.0, 10.0), 3)),
        'duration': float(np.round(rng.normal(5, 2), 3)),
        'item': str(rng.choice(ITEMS, p=weights / weights.sum())),
        'label': int(u % 3),
      }
      for t in times
    ]
    users[f'u{u:02d}'] = events
    lines.extend(json.dumps(e) for e in events)
  rng.shuffle(lines)
  lines += ['{not json', json.dumps({'user': 'u99', 'ts': 1.0, 'amount': 'lots', 'duration': 1, 'item': 'x'})]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return users


@pytest.fixture(scope='module')
def sequences_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('events')
  users = write_events(str(root / 'events.jsonl'))
  # Make item counts distinct (ties would make the vocabulary order arbitrary).
  counts = collections.Counter(e['item'] for events in users.values() for e in events)
  assert len(set(counts.values())) == len(counts), counts
  transform_dir, output = str(root / 'transform'), str(root / 'out' / 'train')
  _, analysed = preprocess.run(
    [
      f'--input={root}/events.jsonl',
      f'--transform_dir={transform_dir}',
      f'--output={output}',
      '--preprocess_kind=sequences',
      '--preprocess_value_fields=amount,duration',
      '--preprocess_key_field=user',
      '--preprocess_time_field=ts',
      '--preprocess_id_field=item',
      '--preprocess_label_field=label',
      '--preprocess_length_buckets=3',
      '--runner=FnApiRunner',
    ]
  )
  return dict(users=users, counts=counts, transform_dir=transform_dir, output=output, analysed=analysed)


def test_sequence_analysers_match_numpy(sequences_run):
  users, analysed = sequences_run['users'], sequences_run['analysed']
  for i, field in enumerate(['amount', 'duration']):
    column = np.array([e[field] for events in users.values() for e in events], np.float64)
    np.testing.assert_allclose(analysed[f'values_{i}/mean'], [column.mean()], rtol=1e-5)
    np.testing.assert_allclose(analysed[f'values_{i}/var'], [column.var()], rtol=1e-4)
    np.testing.assert_allclose(analysed[f'values_{i}/min'], [column.min()], rtol=1e-6)
    np.testing.assert_allclose(analysed[f'values_{i}/max'], [column.max()], rtol=1e-6)
  by_frequency = [item for item, _ in sequences_run['counts'].most_common()]
  assert analysed['vocabulary/item/top'] == by_frequency
  assert analysed['vocabulary/item/size'] == [len(by_frequency)]
  lengths = np.array([len(e) for e in users.values()], float)
  boundaries = np.array(analysed['length/boundaries'])
  assert len(boundaries) == 2 and np.all(np.diff(boundaries) >= 0)
  # Approximate quantiles (epsilon 0.01): each boundary within one rank step of numpy's.
  for q, b in zip([1 / 3, 2 / 3], boundaries):
    assert np.quantile(lengths, q - 0.04, method='lower') <= b <= np.quantile(lengths, q + 0.04, method='higher')


def test_sequence_records_and_serving_agree(sequences_run):
  users, analysed = sequences_run['users'], sequences_run['analysed']
  records = input_pipeline.transformed_examples(sequences_run['transform_dir'], sequences_run['output'] + '-*.tfrecord')
  assert sorted(records) == sorted(users)
  vocab = {item: i for i, item in enumerate(analysed['vocabulary/item/top'])}
  boundaries = np.array(analysed['length/boundaries'], np.float32)
  for user, events in users.items():
    row = records[user]
    for i, field in enumerate(['amount', 'duration']):
      raw = np.array([e[field] for e in events], np.float32)
      mean, var = analysed[f'values_{i}/mean'][0], analysed[f'values_{i}/var'][0]
      np.testing.assert_allclose(row[f'values_{i}'], (raw - mean) / np.sqrt(var), rtol=1e-5, atol=1e-5)
    assert row['ids'].tolist() == [vocab[e['item']] for e in events]
    assert row['label'] == events[-1]['label']
    assert row['length_bucket'] == np.searchsorted(boundaries, np.float32(len(events)), side='right')
  failed = read_jsonl(sequences_run['output'] + '_failed-*.jsonl')
  assert len(failed) == 2 and {f['stage'] for f in failed} == {'parse_event'}

  # Serving: the same events -> canonical raw example -> saved graph.
  raw = [
    (
      user,
      schemas.sequence_raw_example(
        user, [[e['amount'], e['duration']] for e in events], [e['item'] for e in events], events[-1]['label']
      ),
    )
    for user, events in users.items()
  ]
  served = {}

  def matches(actual):
    served.update(dict(actual))
    assert sorted(served) == sorted(users)
    for user, row in records.items():
      for name in ('values_0', 'values_1', 'ids', 'length_bucket', 'label'):
        np.testing.assert_allclose(served[user][name], row[name], rtol=0, atol=1e-6, err_msg=f'{user} {name}')

  # The trainer's input pipeline: per-step features stacked (ids first), the
  # most recent max_len steps kept, padded and masked.
  features = ('ids', 'values_0', 'values_1')
  cfg = DataConfig(
    kind='transformed', transform_dir=sequences_run['transform_dir'], features=features, shape=(None, 3), max_len=8
  )
  (batch,) = input_pipeline.make_dataset(
    cfg, sequences_run['output'] + '-*.tfrecord', 100, train=False
  ).as_numpy_iterator()
  assert batch['inputs'].shape == (len(users), 8, 3)
  trainer_inputs = {}
  for i, (user, row) in enumerate(records.items()):
    steps = min(int(row['length']), 8)
    want = np.stack([row['ids'], row['values_0'], row['values_1']], axis=-1)[-steps:]
    np.testing.assert_allclose(batch['inputs'][i, :steps], want, rtol=1e-6)
    assert batch['mask'][i].tolist() == [True] * steps + [False] * (8 - steps)
    assert not batch['inputs'][i, steps:].any() and batch['label'][i] == row['label']
    trainer_inputs[user] = batch['inputs'][i, :steps]

  # One vocabulary: tf.Transform's file, applied by the saved graph at serving;
  # an item it never saw takes its one OOV bucket, the id after the vocabulary.
  import tensorflow_transform as tft

  from beam_dl.decoding.sequences import SequenceRecord

  vocabulary = tft.TFTransformOutput(sequences_run['transform_dir']).vocabulary_by_name('item')
  assert [t.decode() for t in vocabulary] == analysed['vocabulary/item/top']
  sequences = [
    SequenceRecord(
      user,
      np.array([[e['amount'], e['duration']] for e in events], np.float32),
      label=events[-1]['label'],
      meta={'raw_ids': np.array([e['item'] for e in events], object)},
    )
    for user, events in users.items()
  ] + [SequenceRecord('new', np.ones((2, 2), np.float32), meta={'raw_ids': np.array(['banana', 'zucchini'], object)})]

  def as_trainer(actual):
    actual = dict(actual)
    assert sorted(actual) == sorted([*users, 'new'])
    for user, want in trainer_inputs.items():
      np.testing.assert_allclose(actual[user], want, rtol=0, atol=1e-6, err_msg=user)
    assert actual['new'][:, 0].tolist() == [vocab['banana'], len(vocabulary)]

  with TestPipeline(runner='FnApiRunner') as p:
    out = p | beam.Create(raw) | pp.ApplySavedTransform(sequences_run['transform_dir'], batch_size=8)
    assert_that(out.transformed, matches)
    for_model = (p | 'Sequences' >> beam.Create(sequences)) | pp.TransformSequencesForInference(
      sequences_run['transform_dir'], features, max_len=8
    )
    assert_that(for_model.inputs, as_trainer, label='AsTrainer')


@pytest.mark.slow
def test_sequence_model_trained_on_records_serves_through_transform(sequences_run, tmp_path):
  """A GRU that embeds the vocabulary ids (feature 0), trained by the trainer on
  the transformed records; served on the raw events through the saved graph
  (its scalers and vocabulary) and JaxModelHandler with the trainer's logits."""
  import jax
  import tensorflow_transform as tft

  from beam_dl.decoding.sequences import SequenceRecord
  from beam_dl.models import checkpoints
  from beam_dl.serving.handler import JaxModelHandler
  from beam_dl.training import TrainConfig, train_and_evaluate
  from beam_dl.training.summaries import read_scalars
  from transforms.inference import RunInferenceWithDeadLetters

  users, transform_dir = sequences_run['users'], sequences_run['transform_dir']
  num_ids = len(tft.TFTransformOutput(transform_dir).vocabulary_by_name('item')) + 1  # + the OOV id
  data = DataConfig(
    kind='transformed',
    transform_dir=transform_dir,
    train_files=sequences_run['output'] + '-*.tfrecord',
    features=('ids', 'values_0', 'values_1'),
    shape=(None, 3),
    max_len=8,
    shuffle_buffer=64,
  )
  cfg = TrainConfig(
    model='rnn',
    model_kwargs={'cell': 'gru', 'hidden_size': 16, 'num_outputs': 3, 'vocab_size': num_ids, 'embed_size': 4},
    data=data,
    batch_size=10,
    num_steps=40,
    learning_rate=1e-2,
    log_every=10,
  )
  summary = train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  losses = [loss for _, loss in read_scalars(summary['tensorboard_dir'])['train']['loss']]
  assert len(losses) == 4 and losses[-1] < losses[0], losses

  records = input_pipeline.transformed_examples(transform_dir, data.train_files)
  (batch,) = input_pipeline.make_dataset(data, data.train_files, 100, train=False).as_numpy_iterator()
  spec, variables = checkpoints.load(summary['model_dir'])
  assert spec.is_sequence and spec.input_dtype == 'float32'
  logits = jax.jit(lambda v, x, m: spec.build().apply(v, x, m))(variables, batch['inputs'], batch['mask'])
  want = dict(zip(records, np.asarray(logits)))
  sequences = [
    SequenceRecord(
      user,
      np.array([[e['amount'], e['duration']] for e in events], np.float32),
      meta={'raw_ids': np.array([e['item'] for e in events], object)},
    )
    for user, events in users.items()
  ]

  def close_to_trainer(actual):
    actual = dict(actual)
    assert sorted(actual) == sorted(want)
    for user, expected in want.items():
      np.testing.assert_allclose(actual[user], expected, rtol=1e-4, atol=1e-4, err_msg=user)

  with TestPipeline(runner='FnApiRunner') as p:
    inputs = (p | beam.Create(sequences)) | pp.TransformSequencesForInference(
      transform_dir, data.features, data.max_len
    )
    scored = inputs.inputs | RunInferenceWithDeadLetters(JaxModelHandler(summary['model_dir'], max_batch_size=16))
    assert_that(scored.predictions | beam.Map(lambda kv: (kv[0], np.asarray(kv[1].inference))), close_to_trainer)


def test_sequence_examples_with_min_max_scaling(tmp_path):
  """TFRecords of SequenceExample -> scale_to_0_1 values, matching numpy and JAX."""
  import tensorflow as tf

  from beam_dl.decoding.sequences import SequenceRecord
  from beam_dl.formats.sequence_example import encode_sequence_example
  from beam_dl.preprocessing import tft_jax

  rng = np.random.default_rng(1)
  sequences = {}
  with tf.io.TFRecordWriter(str(tmp_path / 'seq.tfrecord')) as writer:
    for s in range(12):
      length = int(rng.integers(2, 9))
      record = SequenceRecord(
        key=f's{s}',
        values=rng.normal(size=(length, 2)).astype(np.float32) * [1, 50],
        ids=rng.integers(0, 4, size=length).astype(np.int64),
        label=s % 2,
      )
      sequences[record.key] = record
      writer.write(encode_sequence_example(record))
    writer.write(b'not a sequence example')
  transform_dir, output = str(tmp_path / 'transform'), str(tmp_path / 'out' / 'seq')
  _, analysed = preprocess.run(
    [
      f'--input={tmp_path}/seq.tfrecord',
      f'--transform_dir={transform_dir}',
      f'--output={output}',
      '--preprocess_kind=sequences',
      '--preprocess_num_values=2',
      '--preprocess_with_ids',
      '--preprocess_scaling=0_1',
      '--runner=FnApiRunner',
    ]
  )
  records = input_pipeline.transformed_examples(transform_dir, output + '-*.tfrecord')
  assert sorted(records) == sorted(sequences)
  assert len(read_jsonl(output + '_failed-*.jsonl')) == 1
  all_values = np.concatenate([r.values for r in sequences.values()])
  for i in range(2):
    low, high = all_values[:, i].min(), all_values[:, i].max()
    assert analysed[f'values_{i}/min'] == [pytest.approx(low)] and analysed[f'values_{i}/max'] == [pytest.approx(high)]
    scale = tft_jax.scaler(transform_dir, f'values_{i}')
    for key, record in sequences.items():
      np.testing.assert_allclose(records[key][f'values_{i}'], (record.values[:, i] - low) / (high - low), atol=1e-6)
      np.testing.assert_allclose(np.asarray(scale(record.values[:, i])), records[key][f'values_{i}'], rtol=0, atol=1e-7)
  vocab = {token: i for i, token in enumerate(analysed['vocabulary/item/top'])}
  for key, record in sequences.items():
    assert records[key]['ids'].tolist() == [vocab[str(i)] for i in record.ids]
