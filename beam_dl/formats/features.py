"""tf.train.Feature builders and value checks shared by the record formats."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

_INT64 = np.iinfo(np.int64)


def tensorflow():
  """TensorFlow, imported on first use (keeps `import beam_dl` light).

  No module global is cached: after the first import this is a dict lookup
  in sys.modules, and module state stays the same on every worker.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


def bytes_feature(values: Iterable[bytes]):
  """A tf.train.Feature holding `values` as a bytes list."""
  tf = tensorflow()
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def int64_feature(values: Iterable[Any]):
  """A tf.train.Feature holding `values` as an int64 list."""
  tf = tensorflow()
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def float_feature(values: Any):
  """A tf.train.Feature holding `values` (any array-like) as a float list."""
  tf = tensorflow()
  return tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(values, np.float32).reshape(-1).tolist()))


def feature_values(features: Mapping[str, Any], name: str, kind: str) -> list:
  """The values of feature `name` of a parsed proto's feature map; [] when absent.

  `kind` is the value list to read: 'bytes_list', 'int64_list' or 'float_list'.
  """
  if name not in features:
    return []
  return list(getattr(features[name], kind).value)


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
