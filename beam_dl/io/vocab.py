"""Categorical ids: vocabulary lookup and hashing into a fixed number of buckets.

Both follow the conventions of Keras' `StringLookup` / `Hashing` layers so the
ids written here match what a TensorFlow-side preprocessing would produce:

* `Vocabulary`: out-of-vocabulary tokens take the first `num_oov_buckets` ids
  (hashed among them), known tokens follow in vocabulary order.
* `hash_ids`: TensorFlow's `tf.strings.to_hash_bucket_fast` (FarmHash64), the
  function behind `tf.keras.layers.Hashing`, stable across processes and
  machines (unlike Python's `hash`). One call hashes a whole sequence.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from beam_dl.io.sequences import _tf


def hash_ids(tokens: Sequence[str] | np.ndarray, num_buckets: int) -> np.ndarray:
  """int64 bucket in [0, num_buckets) for each token (FarmHash64 mod buckets)."""
  if num_buckets < 1:
    raise ValueError(f'num_buckets must be >= 1, got {num_buckets}')
  if len(tokens) == 0:
    return np.zeros((0,), np.int64)
  tf = _tf()
  strings = tf.constant([str(t) for t in tokens], tf.string)
  return tf.strings.to_hash_bucket_fast(strings, num_buckets).numpy().astype(np.int64)


class Vocabulary:
  """Token -> id map with hashed out-of-vocabulary buckets.

  Args:
    tokens: the vocabulary, most frequent first (duplicates keep the first).
    num_oov_buckets: ids 0..num_oov_buckets-1 are for unknown tokens, which
      are hashed among them; 0 makes unknown tokens an error (KeyError).
  """

  def __init__(self, tokens: Iterable[str], num_oov_buckets: int = 1):
    if num_oov_buckets < 0:
      raise ValueError(f'num_oov_buckets must be >= 0, got {num_oov_buckets}')
    self.num_oov_buckets = num_oov_buckets
    self.tokens: list[str] = []
    self._index: dict[str, int] = {}
    for tok in tokens:
      tok = str(tok)
      if tok not in self._index:
        self._index[tok] = num_oov_buckets + len(self.tokens)
        self.tokens.append(tok)

  @classmethod
  def from_file(cls, path: str, num_oov_buckets: int = 1) -> 'Vocabulary':
    """One token per line (the format of tft.vocabulary files); any Beam filesystem."""
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
    with FileSystems.open(path) as f:
      text = f.read().decode('utf-8')
    return cls([line for line in text.splitlines() if line], num_oov_buckets)

  @property
  def size(self) -> int:
    """Number of ids (the embedding table size): OOV buckets + tokens."""
    return self.num_oov_buckets + len(self.tokens)

  def lookup(self, tokens: Sequence[str] | np.ndarray) -> np.ndarray:
    """int64 id per token; unknown tokens hash into the OOV buckets."""
    ids = np.empty(len(tokens), np.int64)
    unknown = []
    for i, tok in enumerate(tokens):
      idx = self._index.get(str(tok))
      if idx is None:
        if not self.num_oov_buckets:
          raise KeyError(f'token {tok!r} is not in the vocabulary')
        unknown.append(i)
      else:
        ids[i] = idx
    if unknown and self.num_oov_buckets == 1:
      ids[unknown] = 0
    elif unknown:
      ids[unknown] = hash_ids([tokens[i] for i in unknown], self.num_oov_buckets)
    return ids

  def __len__(self) -> int:
    return self.size

  def __reduce__(self):
    return (Vocabulary, (self.tokens, self.num_oov_buckets))
