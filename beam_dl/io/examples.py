"""tf.train.Example encoding of decoded images (the on-disk training format).

Features: `image/raw` (bytes: the uint8 array's C-order HWC `tobytes()`),
`image/shape` (int64 [H, W, C]), `label` (int64 class index, -1 if unknown)
and `key` (utf-8 bytes). Sequences use `beam_dl.io.sequences.encode_sequence_example`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from beam_dl.io.sequences import _tf

RAW, SHAPE, LABEL, KEY = 'image/raw', 'image/shape', 'label', 'key'
_INT64 = np.iinfo(np.int64)


def int64_label(label) -> int:
  """A class label as an int that an int64 feature can hold, else ValueError.

  Integral floats (3.0, as JSON may carry them) are accepted; 2**63, 1e30,
  3.5, 'cat' are refused with a reason instead of failing in protobuf.
  """
  try:
    value = int(label)
  except (TypeError, ValueError, OverflowError):
    raise ValueError(f'label {label!r} is not an integer') from None
  if isinstance(label, float) and value != label:
    raise ValueError(f'label {label!r} is not an integer')
  if not _INT64.min <= value <= _INT64.max:
    raise ValueError(f'label {label!r} does not fit int64')
  return value


def encode_image_example(key: str, image: np.ndarray, label: int | None = None) -> bytes:
  """One decoded image as a serialized tf.train.Example."""
  tf = _tf()
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'image must be uint8, got {image.dtype}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f'image must be HWC (or HW), got shape {image.shape}')
  feats = {
      RAW: tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[np.ascontiguousarray(image).tobytes()])),
      SHAPE: tf.train.Feature(int64_list=tf.train.Int64List(value=list(image.shape))),
      LABEL: tf.train.Feature(int64_list=tf.train.Int64List(
          value=[-1 if label is None else int64_label(label)])),
      KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(key).encode('utf-8')])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def decode_image_examples(serialized: Sequence[bytes]) -> list[tuple[str, np.ndarray, int]]:
  """Serialized image examples -> (key, uint8 HWC array, label), one TF call per batch."""
  tf = _tf()
  parsed = tf.io.parse_example(list(serialized), {
      RAW: tf.io.FixedLenFeature([], tf.string),
      SHAPE: tf.io.FixedLenFeature([3], tf.int64),
      LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
      KEY: tf.io.FixedLenFeature([], tf.string, default_value=b''),
  })
  raws, shapes = parsed[RAW].numpy(), parsed[SHAPE].numpy()
  return [(k.decode('utf-8'), np.frombuffer(r, np.uint8).reshape(s), int(l))
          for k, r, s, l in zip(parsed[KEY].numpy(), raws, shapes, parsed[LABEL].numpy())]
