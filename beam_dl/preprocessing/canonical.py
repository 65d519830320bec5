"""Raw inputs -> canonical raw examples (`schemas`), with a reason when they can't.

Pure functions over one record each, so the Beam DoFns in
`transforms.preprocessing` only route their results and failures.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from beam_dl.decoding.images import ImageDecodeError, ImageSpec, decode_image
from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.formats import image_example
from beam_dl.preprocessing import schemas

LABEL_IN_NAME = re.compile(r'_label(\d+)\.')


class CanonicalError(ValueError):
  """A raw record that cannot become a canonical raw example; `stage` names the step.

  `key` is the record's own key when it could be read (e.g. a TFRecord's
  `key`/`image/key` feature), else None.
  """

  def __init__(self, message: str, stage: str = 'parse', key: str | None = None):
    super().__init__(message)
    self.stage = stage
    self.key = key


def image_spec_for(shape) -> ImageSpec:
  height, width, channels = shape
  return ImageSpec(height=height, width=width, channels=channels)


def label_from_name(path: str, pattern: re.Pattern = LABEL_IN_NAME) -> int | None:
  """The class in a file name like digit_0001_label7.png (pipelines.demo), or None."""
  match = pattern.search(path)
  return int(match.group(1)) if match else None


def image_file_to_raw(path: str, data: bytes, image_spec: ImageSpec) -> bytes:
  """An encoded image file -> canonical raw example keyed by its path."""
  try:
    image = decode_image(data, image_spec)
  except ImageDecodeError as e:
    raise CanonicalError(str(e), 'decode', path) from None
  return _encode_image(path, image, label_from_name(path))


def _encode_image(key: str, image: np.ndarray, label) -> bytes:
  """The canonical raw image example; a label that int64 can't hold -> CanonicalError."""
  try:
    return image_example.encode_image_example(key, image, label)
  except ValueError as e:
    raise CanonicalError(str(e), 'canonical', key) from None


def image_record_to_raw(record: bytes, image_spec: ImageSpec, fallback_key: str) -> bytes:
  """An image tf.train.Example of either layout (`beam_dl.formats.image_example`:
  decoded `image/raw` + `image/shape`, or encoded `image/encoded`) -> canonical raw example."""
  try:
    parsed = image_example.parse_image_example(record)
  except image_example.ImageExampleError as e:
    raise CanonicalError(str(e), 'parse', e.key) from None
  key = fallback_key if parsed.key is None else parsed.key
  try:
    image = _record_image(parsed, image_spec)
  except CanonicalError as e:  # the record's own key from here on, not the file hash
    raise CanonicalError(str(e), e.stage, key) from None
  return _encode_image(key, image, parsed.label)


def _record_image(parsed: image_example.ImageExample, image_spec: ImageSpec) -> np.ndarray:
  """The uint8 image of a parsed image Example: its pixels, which must have the
  configured shape, or its encoded file decoded to `image_spec`."""
  if parsed.pixels is not None:
    expected = (image_spec.height, image_spec.width, image_spec.channels)
    if parsed.pixels.shape != expected:
      raise CanonicalError(f'{image_example.SHAPE} {parsed.pixels.shape} is not the configured {expected}')
    return parsed.pixels
  try:
    return decode_image(parsed.encoded, image_spec)
  except ImageDecodeError as e:
    raise CanonicalError(str(e), 'decode') from None


def record_key(filename: str, record: bytes) -> str:
  """`<file>@sha1:<digest>`: a stable key for a record without one."""
  return f'{filename}@sha1:{hashlib.sha1(record).hexdigest()[:16]}'


def sequence_to_raw(record: SequenceRecord, num_values: int, with_ids: bool) -> bytes:
  """A `SequenceRecord` -> canonical raw sequence example, checked against the config."""
  values = np.asarray(record.values)
  if values.ndim != 2 or values.shape[1] != num_values:
    raise CanonicalError(f'values have shape {values.shape}, expected [T, {num_values}]', 'canonical')
  if len(values) == 0:
    raise CanonicalError('empty sequence (0 steps)', 'canonical')
  if not np.all(np.isfinite(values)):
    raise CanonicalError('values are not all finite', 'canonical')
  has_ids = bool(record.meta and record.meta.get('raw_ids') is not None) or record.ids is not None
  if with_ids and not has_ids:
    raise CanonicalError('sequence has no ids but the preprocessing expects them', 'canonical')
  try:
    if with_ids:
      return schemas.sequence_record_example(record)
    return schemas.sequence_raw_example(record.key, values, None, record.label)
  except ValueError as e:
    raise CanonicalError(str(e), 'canonical') from None
