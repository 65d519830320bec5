"""Real example data sets written in the shared TFRecord formats.

Small helpers that turn data shipped by scikit-learn and statsmodels into the
same TFRecord shards the Beam pipelines produce (records encoded by
`beam_dl.formats`), so configs, tests and the benchmark train on real data
through the real input pipeline.

- `write_digits`: scikit-learn's 1,797 8x8 handwritten digits (pixel values
  0..16 as uint8; scale by 1/16) as image tf.train.Examples.
- `write_co2`: the Mauna Loa CO2 record (statsmodels), monthly, cut into
  windows of `window` months as SequenceExamples whose `values` are each
  month's level minus the window's last level and whose `target` is next
  month's change: a seasonal forecasting task. Split by time.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.formats.image_example import encode_image_example
from beam_dl.formats.sequence_example import encode_sequence_example


def write_shards(records: list[bytes], prefix: str, num_shards: int) -> str:
  """Writes serialized records round-robin into `num_shards` TFRecord files; returns their glob."""
  os.makedirs(os.path.dirname(prefix) or '.', exist_ok=True)
  for s in range(num_shards):
    with tf.io.TFRecordWriter(f'{prefix}-{s:05d}-of-{num_shards:05d}.tfrecord') as w:
      for r in records[s::num_shards]:
        w.write(r)
  return f'{prefix}-*-of-{num_shards:05d}.tfrecord'


def write_digits(out_dir: str, *, eval_fraction: float = 0.2, num_shards: int = 4, seed: int = 0) -> tuple[str, str]:
  """Writes digits train/eval shards; returns (train glob, eval glob)."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # [N, 8, 8, 1], 0..16
  order = np.random.default_rng(seed).permutation(len(images))
  n_eval = int(len(images) * eval_fraction)
  splits = {'eval': order[:n_eval], 'train': order[n_eval:]}
  globs = {}
  for split, idx in splits.items():
    records = [encode_image_example(f'digits/{i}', images[i], int(digits.target[i])) for i in idx]
    globs[split] = write_shards(records, os.path.join(out_dir, f'digits_{split}'), num_shards)
  return globs['train'], globs['eval']


def co2_monthly() -> np.ndarray:
  """Monthly mean Mauna Loa CO2 (ppm), gaps interpolated: 526 months."""
  import statsmodels.api as sm

  weekly = sm.datasets.co2.load_pandas().data['co2']
  return weekly.resample('MS').mean().interpolate().to_numpy(np.float32)


def co2_windows(window: int = 24):
  """(inputs [N, window, 1], targets [N, 1]) relative to each window's last month."""
  series = co2_monthly()
  xs, ys = [], []
  for end in range(window, len(series)):
    w = series[end - window : end]
    xs.append((w - w[-1])[:, None])
    ys.append([series[end] - w[-1]])
  return np.asarray(xs, np.float32), np.asarray(ys, np.float32)


def write_co2(out_dir: str, *, window: int = 24, eval_fraction: float = 0.2, num_shards: int = 2) -> tuple[str, str]:
  """Writes co2 forecasting windows, the last `eval_fraction` in time for eval."""
  xs, ys = co2_windows(window)
  n_train = int(len(xs) * (1 - eval_fraction))
  globs = {}
  for split, rng in (('train', range(n_train)), ('eval', range(n_train, len(xs)))):
    records = [encode_sequence_example(SequenceRecord(f'co2/{i}', xs[i], target=ys[i])) for i in rng]
    globs[split] = write_shards(records, os.path.join(out_dir, f'co2_{split}'), num_shards)
  return globs['train'], globs['eval']
