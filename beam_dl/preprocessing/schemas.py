"""Raw feature specs and canonical raw tf.Examples fed to tf.Transform.

Every raw record, whatever it was read from (image files, image TFRecords,
JSON-lines events, SequenceExamples), is first made into a *canonical raw
tf.Example* with the features below, and only then parsed by tfx-bsl's TFXIO
into Arrow RecordBatches for tf.Transform. The serving pipeline builds the
same canonical example from the same raw input, so the saved transform graph
sees identical tensors in training and serving.

Images (the decoded-image format of the shared TFRecords):
  image/raw    bytes, the uint8 HWC array's C-order tobytes()
  image/shape  int64 [3], H, W, C
  label        int64 class index (-1 unknown)
  key          bytes (utf-8)

Sequences (one example per sequence, per-step columns flattened):
  key, label   as above
  length       int64 number of steps T
  values_<i>   float [T], feature i of every step (i < num_values)
  item         bytes [T], the raw categorical id of every step (optional)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from beam_dl.decoding.sequences import SequenceRecord

# The decoded-image Example format is defined once, in beam_dl.formats.image_example.
from beam_dl.formats import image_example
from beam_dl.formats.features import bytes_feature, float_feature, int64_feature
from beam_dl.formats.image_example import KEY, LABEL
from beam_dl.formats.image_example import RAW as IMAGE_RAW  # noqa: F401  (schemas' name for it)
from beam_dl.formats.image_example import SHAPE as IMAGE_SHAPE  # noqa: F401

LENGTH, ITEM = 'length', 'item'


def _tf():
  """TensorFlow, imported on first use (keeps importing this module light)."""
  import tensorflow as tf

  return tf


def value_column(i: int) -> str:
  """Name of the raw (and transformed) column of per-step feature i."""
  return f'values_{i}'


def image_feature_spec() -> dict:
  """tf.io feature spec of canonical raw image examples (every feature required)."""
  return image_example.feature_spec(defaults=False)


def sequence_feature_spec(num_values: int, with_ids: bool) -> dict:
  """tf.io feature spec of canonical raw sequence examples."""
  tf = _tf()
  spec = {
    KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    LENGTH: tf.io.FixedLenFeature([], tf.int64),
  }
  spec.update({value_column(i): tf.io.VarLenFeature(tf.float32) for i in range(num_values)})
  if with_ids:
    spec[ITEM] = tf.io.VarLenFeature(tf.string)
  return spec


def schema_from_feature_spec(feature_spec: dict):
  """tensorflow_metadata Schema proto of a feature spec (what TFXIO needs)."""
  from tensorflow_transform.tf_metadata import schema_utils

  return schema_utils.schema_from_feature_spec(feature_spec)


def sequence_raw_example(
  key: str,
  values: np.ndarray,
  items: Sequence[str] | None = None,
  label: int | None = None,
) -> bytes:
  """One sequence ([T, F] values, optional [T] raw ids) as a canonical raw example."""
  tf = _tf()
  values = np.asarray(values, np.float32)
  if values.ndim != 2:
    raise ValueError(f'values must be [T, F], got shape {values.shape}')
  if items is not None and len(items) != len(values):
    raise ValueError(f'{len(items)} ids for {len(values)} steps')
  features = {
    KEY: bytes_feature([str(key).encode('utf-8')]),
    LABEL: int64_feature([-1 if label is None else label]),
    LENGTH: int64_feature([len(values)]),
  }
  for i in range(values.shape[1]):
    features[value_column(i)] = float_feature(values[:, i])
  if items is not None:
    features[ITEM] = bytes_feature([str(t).encode('utf-8') for t in items])
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def sequence_record_example(record: SequenceRecord) -> bytes:
  """A `SequenceRecord` (from events or SequenceExamples) as a canonical raw example.

  Categorical ids are the events' raw string ids (`meta['raw_ids']`) when
  present, else the record's integer ids as strings: either way tf.Transform
  builds the vocabulary.
  """
  items = record.meta.get('raw_ids') if record.meta else None
  if items is None and record.ids is not None:
    items = [str(int(i)) for i in record.ids]
  return sequence_raw_example(record.key, record.values, items, record.label)
