"""Writing image and sequence examples as sharded TFRecords, read back with TF."""

import glob
import os

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.formats import image_example
from beam_dl.formats.sequence_example import SequenceSpec
from transforms import sequences as seq_transforms
from transforms import tfrecords


def _read_all(pattern):
  files = sorted(glob.glob(pattern))
  return files, [r.numpy() for r in tf.data.TFRecordDataset(files)]


def test_write_image_examples_in_the_shared_format(tmp_path):
  rng = np.random.default_rng(0)
  images = {f'img{i}': rng.integers(0, 256, (4 + i, 5, 3), dtype=np.uint8) for i in range(5)}
  elements = (
    [('img0', images['img0'], 2), ('img1', images['img1'], {'label': 1, 'path': 'x'})]
    + [{'key': k, 'image': images[k], 'label': 0} for k in ('img2', 'img3')]
    + [('img4', images['img4'])]
  )
  prefix = os.path.join(tmp_path, 'images')
  with TestPipeline(runner='FnApiRunner') as p:
    _ = p | beam.Create(elements) | tfrecords.WriteImageExamples(prefix, num_shards=2)
  files, records = _read_all(prefix + '-*')
  assert len(files) == 2 and all(f.endswith('.tfrecord') for f in files)
  parsed = tf.io.parse_example(
    records,
    {
      'image/raw': tf.io.FixedLenFeature([], tf.string),
      'image/shape': tf.io.FixedLenFeature([3], tf.int64),
      'label': tf.io.FixedLenFeature([], tf.int64),
      'key': tf.io.FixedLenFeature([], tf.string),
    },
  )
  labels = {'img0': 2, 'img1': 1, 'img2': 0, 'img3': 0, 'img4': -1}
  assert len(records) == 5
  for raw, shape, label, key in zip(*(parsed[k].numpy() for k in ('image/raw', 'image/shape', 'label', 'key'))):
    key = key.decode()
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(shape), images[key])
    assert label == labels[key]
  assert {k for k, _, _ in image_example.decode_image_examples(records)} == set(images)


def test_write_sequence_examples_round_trip(tmp_path):
  recs = [
    SequenceRecord('a', np.array([[1, 2], [3, 4]], np.float32), np.array([5, 6]), label=1),
    SequenceRecord('b', np.array([[7, 8]], np.float32), target=0.25),
  ]
  prefix = os.path.join(tmp_path, 'seq')
  with TestPipeline(runner='FnApiRunner') as p:
    _ = p | beam.Create(recs) | tfrecords.WriteSequenceExamples(prefix, num_shards=1)
  files, records = _read_all(prefix + '-*')
  assert len(files) == 1 and len(records) == 2
  ctx, seq = tf.io.parse_single_sequence_example(
    next(r for r in records if b'a' in r[:40]),
    {'key': tf.io.FixedLenFeature([], tf.string), 'label': tf.io.FixedLenFeature([], tf.int64)},
    {'values': tf.io.FixedLenSequenceFeature([2], tf.float32), 'ids': tf.io.FixedLenSequenceFeature([1], tf.int64)},
  )
  assert ctx['key'].numpy() == b'a' and ctx['label'].numpy() == 1
  np.testing.assert_array_equal(seq['values'].numpy(), [[1, 2], [3, 4]])
  # And back through our own reader.
  with TestPipeline(runner='FnApiRunner') as p:
    out = p | seq_transforms.ReadSequenceExamples(prefix + '-*', SequenceSpec(num_features=2))
    assert_that(
      out.parsed | beam.Map(lambda r: (r.key, r.values.tolist(), r.label, r.target)),
      equal_to([('a', [[1, 2], [3, 4]], 1, None), ('b', [[7, 8]], None, 0.25)]),
    )
    assert_that(out.failed, equal_to([]), label='no_failures')
