"""The analysed statistics, carried out of the transform graph and reported.

tf.Transform folds analyser results (means, variances, quantile boundaries)
into the transform graph as constants; it has no API to read them back. So a
`preprocessing_fn` also outputs each statistic it uses as a feature named
`stats/<name>`, broadcast to every row: the pipeline reads one row of them into
`stats.json` and drops them before writing training records, and the serving
transform drops them too. The values are the very tensors the scaling used.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

PREFIX = 'stats/'
STATS_FILE = 'stats.json'


def broadcast(values: Mapping[str, Any], batch_size) -> dict:
  """{'stats/<name>': [batch, n] float32} from analyser outputs of static size n."""
  import tensorflow as tf

  out = {}
  for name, value in values.items():
    value = tf.cast(value, tf.float32)
    n = value.shape.num_elements()
    if n is None:
      raise ValueError(f'statistic {name!r} has no static size: {value.shape}')
    out[PREFIX + name] = tf.broadcast_to(tf.reshape(value, [1, n]), tf.stack([batch_size, n]))
  return out


def is_stat(name: str) -> bool:
  return name.startswith(PREFIX)


def drop(features: Mapping[str, Any]) -> dict:
  """`features` without the broadcast statistics."""
  return {k: v for k, v in features.items() if not is_stat(k)}


def from_row(row: Mapping[str, Any]) -> dict[str, list[float]]:
  """The statistics of one transformed instance dict: {name: [floats]}."""
  return {k[len(PREFIX) :]: np.asarray(v, np.float64).reshape(-1).tolist() for k, v in row.items() if is_stat(k)}


def write(transform_dir: str, stats: Mapping[str, Any]) -> str:
  """Writes `stats` as JSON to <transform_dir>/stats.json; returns the path."""
  from apache_beam.io.filesystems import FileSystems

  path = FileSystems.join(transform_dir, STATS_FILE)
  with FileSystems.create(path) as f:
    f.write(json.dumps(stats, indent=2, sort_keys=True).encode('utf-8'))
  return path


def load(transform_dir: str) -> dict:
  """The statistics written by `pipelines.preprocess` for `transform_dir`."""
  from apache_beam.io.filesystems import FileSystems

  with FileSystems.open(os.path.join(transform_dir, STATS_FILE)) as f:
    return json.loads(f.read().decode('utf-8'))
