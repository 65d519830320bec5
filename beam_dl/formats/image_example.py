"""The image tf.train.Example: one image per record, as pixels or as an encoded file.

Two layouts, told apart by their features:

pixels: what beam_dl writes (`transforms.tfrecords.WriteImageExamples`,
`pipelines.preprocess`'s canonical raw records, `training.datasets`) and
what training reads:
  image/raw    bytes, the uint8 array's C-order HWC `tobytes()`
  image/shape  int64 [3]: H, W, C
  label        int64 class index, -1 when unknown
  key          bytes, utf-8

encoded: the usual layout of image TFRecords other tools write; read by
`transforms.images.ReadImageExamples` and `pipelines.preprocess`:
  image/encoded      bytes, one PNG/JPEG/... file
  image/key          bytes, utf-8 (optional)
  image/class/label  int64 (optional)

Beam side: `encode_image_example` (pixels layout), `encode_file_example`
(encoded layout), `parse_image_example` (one record of either layout, for
per-record dead letters) and `decode_image_examples` (a batch of pixel
records in one TensorFlow call). Training side (tf.data): `feature_spec` and
`parse_pixels`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from beam_dl.core.deadletter import describe
from beam_dl.formats.features import bytes_feature, feature_values, int64_feature, int64_label, tensorflow

RAW, SHAPE, LABEL, KEY = 'image/raw', 'image/shape', 'label', 'key'
ENCODED, ENCODED_KEY, ENCODED_LABEL = 'image/encoded', 'image/key', 'image/class/label'
UNKNOWN_LABEL = -1

__all__ = [
  'RAW',
  'SHAPE',
  'LABEL',
  'KEY',
  'ENCODED',
  'ENCODED_KEY',
  'ENCODED_LABEL',
  'UNKNOWN_LABEL',
  'ImageExample',
  'ImageExampleError',
  'int64_label',
  'encode_image_example',
  'encode_file_example',
  'parse_image_example',
  'decode_image_examples',
  'feature_spec',
  'parse_pixels',
]


class ImageExampleError(ValueError):
  """A record that is not a readable image Example; the message is the reason.

  `key` is the record's own key when it could be read before the error, else None.
  """

  def __init__(self, message: str, key: str | None = None):
    super().__init__(message)
    self.key = key


@dataclasses.dataclass(frozen=True, eq=False)
class ImageExample:
  """One parsed record: `pixels` (uint8 [H, W, C]) or `encoded` file bytes.

  `key` and `label` are None when the record has none.
  """

  key: str | None
  label: int | None
  pixels: np.ndarray | None = None
  encoded: bytes | None = None


def encode_image_example(key: str, image: np.ndarray, label: int | None = None) -> bytes:
  """One decoded uint8 image ([H, W, C] or [H, W]) as a serialized pixels-layout Example."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'image must be uint8, got {image.dtype}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f'image must be HWC (or HW), got shape {image.shape}')
  return _example(
    {
      RAW: bytes_feature([np.ascontiguousarray(image).tobytes()]),
      SHAPE: int64_feature(image.shape),
      LABEL: int64_feature([UNKNOWN_LABEL if label is None else int64_label(label)]),
      KEY: bytes_feature([str(key).encode('utf-8')]),
    }
  )


def encode_file_example(key: str | None, data: bytes, label: int | None = None) -> bytes:
  """One encoded image file (PNG, JPEG...) as a serialized encoded-layout Example."""
  features = {ENCODED: bytes_feature([data])}
  if key is not None:
    features[ENCODED_KEY] = bytes_feature([str(key).encode('utf-8')])
  if label is not None:
    features[ENCODED_LABEL] = int64_feature([int64_label(label)])
  return _example(features)


def _example(features: dict) -> bytes:
  tf = tensorflow()
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def parse_image_example(
  record: bytes, *, encoded_feature: str = ENCODED, key_feature: str = ENCODED_KEY, label_feature: str = ENCODED_LABEL
) -> ImageExample:
  """One serialized Example of either layout -> `ImageExample`, or ImageExampleError.

  A record with `image/raw` is read as pixels (checked against
  `image/shape`), else one `encoded_feature` value is the encoded file. The
  key is the first of `key_feature` and `key` present, the label likewise
  of `label_feature` and `label`.
  """
  tf = tensorflow()
  try:
    features = tf.train.Example.FromString(record).features.feature
  except Exception as e:  # protobuf's DecodeError is a bare Exception subclass
    raise ImageExampleError(f'not a tf.train.Example: {describe(e)}') from None
  keys = feature_values(features, key_feature, 'bytes_list') or feature_values(features, KEY, 'bytes_list')
  key = keys[0].decode('utf-8', 'replace') if keys else None
  labels = feature_values(features, label_feature, 'int64_list') or feature_values(features, LABEL, 'int64_list')
  label = int(labels[0]) if labels else None
  raw = feature_values(features, RAW, 'bytes_list')
  if raw:
    return ImageExample(key, label, pixels=_pixels(raw, feature_values(features, SHAPE, 'int64_list'), key))
  encoded = feature_values(features, encoded_feature, 'bytes_list')
  if len(encoded) != 1:
    raise ImageExampleError(
      f'expected {RAW} + {SHAPE}, or 1 bytes value in feature {encoded_feature!r}, found {len(encoded)}', key
    )
  return ImageExample(key, label, encoded=encoded[0])


def _pixels(raw: list[bytes], shape: list[int], key: str | None) -> np.ndarray:
  """The uint8 [H, W, C] array of `image/raw` values, checked against `image/shape`."""
  if len(raw) != 1:
    raise ImageExampleError(f'expected 1 {RAW} value, found {len(raw)}', key)
  if len(shape) != 3 or min(shape) < 0:
    raise ImageExampleError(f'{SHAPE} {tuple(shape)} is not [H, W, C]', key)
  if len(raw[0]) != int(np.prod(shape)):
    raise ImageExampleError(f'{RAW} has {len(raw[0])} bytes, {SHAPE} {tuple(shape)} needs {int(np.prod(shape))}', key)
  return np.frombuffer(raw[0], np.uint8).reshape(shape)


def decode_image_examples(serialized: Sequence[bytes]) -> list[tuple[str, np.ndarray, int]]:
  """Serialized pixels-layout Examples -> (key, uint8 HWC array, label), one TF call per batch."""
  tf = tensorflow()
  parsed = tf.io.parse_example(list(serialized), feature_spec())
  raws, shapes = parsed[RAW].numpy(), parsed[SHAPE].numpy()
  return [
    (k.decode('utf-8'), np.frombuffer(r, np.uint8).reshape(s), int(l))
    for k, r, s, l in zip(parsed[KEY].numpy(), raws, shapes, parsed[LABEL].numpy())
  ]


def feature_spec(*, defaults: bool = True) -> dict:
  """The tf.io feature spec of the pixels layout.

  With `defaults` a record without `label` or `key` parses as -1 / b'';
  without, both are required (tf.Transform's schema of canonical records).
  """
  tf = tensorflow()
  optional = ({'default_value': UNKNOWN_LABEL}, {'default_value': b''}) if defaults else ({}, {})
  return {
    RAW: tf.io.FixedLenFeature([], tf.string),
    SHAPE: tf.io.FixedLenFeature([3], tf.int64),
    LABEL: tf.io.FixedLenFeature([], tf.int64, **optional[0]),
    KEY: tf.io.FixedLenFeature([], tf.string, **optional[1]),
  }


def parse_pixels(serialized, shape: Sequence[int]) -> dict:
  """tf.data: a batch of serialized pixels-layout Examples -> {'image', 'label'} tensors.

  'image' is uint8 [B, *shape] (every record must hold that shape), 'label'
  int64 [B] (-1 when unknown). Only `image/raw` and `label` are parsed: the
  shape is the data config's, not read per record.
  """
  tf = tensorflow()
  spec = {name: value for name, value in feature_spec().items() if name in (RAW, LABEL)}
  parsed = tf.io.parse_example(serialized, spec)
  images = tf.reshape(tf.io.decode_raw(parsed[RAW], tf.uint8), (-1,) + tuple(int(d) for d in shape))
  return {'image': images, 'label': parsed[LABEL]}
