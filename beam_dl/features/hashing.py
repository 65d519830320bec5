"""Categorical ids hashed into a fixed number of buckets.

`hash_ids` is TensorFlow's `tf.strings.to_hash_bucket_fast` (FarmHash64), the
function behind `tf.keras.layers.Hashing` and `tft.hash_strings`, stable
across processes and machines (unlike Python's `hash`). One call hashes a
whole sequence. Vocabularies are tf.Transform's alone
(`tft.compute_and_apply_vocabulary` in `beam_dl.preprocessing`), applied at
serving by the saved transform graph, so training and serving cannot skew.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from beam_dl.decoding.sequences import _tf


def hash_ids(tokens: Sequence[str] | np.ndarray, num_buckets: int) -> np.ndarray:
  """int64 bucket in [0, num_buckets) for each token (FarmHash64 mod buckets)."""
  if num_buckets < 1:
    raise ValueError(f'num_buckets must be >= 1, got {num_buckets}')
  if len(tokens) == 0:
    return np.zeros((0,), np.int64)
  tf = _tf()
  strings = tf.constant([str(t) for t in tokens], tf.string)
  return tf.strings.to_hash_bucket_fast(strings, num_buckets).numpy().astype(np.int64)
