"""tf.Transform `preprocessing_fn`s: the one definition of model features.

Each factory returns a `preprocessing_fn(inputs) -> outputs` over the canonical
raw features of `beam_dl.preprocessing.schemas`. `tft_beam` analyses it over
the whole data set (full-pass analysers) and saves it as a transform graph
that training records and serving pipelines both apply.

Images: pixels scaled with the global z-score (`tft.scale_to_z_score`) or
min/max (`tft.scale_to_0_1`) of all pixels of all images.
Sequences: every per-step value column z-scored or min/max-scaled, raw item
ids mapped through a vocabulary (`tft.compute_and_apply_vocabulary`, most
frequent first, one OOV bucket), and sequence length bucketized at quantile
boundaries (`tft.quantiles` + `tft.apply_buckets`, i.e. `tft.bucketize`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from beam_dl.preprocessing import schemas, stats

SCALINGS = ('z_score', '0_1')
ITEM_VOCABULARY = 'item'
IMAGE = 'image'
IDS, LENGTH_BUCKET = 'ids', 'length_bucket'


def _check_scaling(scaling: str) -> None:
  if scaling not in SCALINGS:
    raise ValueError(f'scaling must be one of {SCALINGS}, got {scaling!r}')


def _scale(x, scaling: str, name: str, batch_size):
  """(scaled x, its statistics as broadcast `stats/` outputs)."""
  import tensorflow_transform as tft

  if scaling == 'z_score':
    scaled = tft.scale_to_z_score(x)
  else:
    scaled = tft.scale_to_0_1(x)
  # The same analysers the scaler used (tf.Transform deduplicates them).
  values = {
    f'{name}/mean': tft.mean(x),
    f'{name}/var': tft.var(x),
    f'{name}/min': tft.min(x),
    f'{name}/max': tft.max(x),
  }
  return scaled, stats.broadcast(values, batch_size)


def image_preprocessing_fn(shape: Sequence[int], scaling: str = 'z_score') -> Callable:
  """Raw image examples of `shape` (H, W, C) -> {'image': float32 [H*W*C], 'label', 'key'}.

  The image stays flat in the records (a fixed-length float list); readers
  reshape it to `shape`.
  """
  _check_scaling(scaling)
  size = int(math.prod(shape))

  def preprocessing_fn(inputs):
    import tensorflow as tf

    pixels = tf.io.decode_raw(inputs[schemas.IMAGE_RAW], tf.uint8)
    pixels = tf.cast(tf.reshape(pixels, [-1, size]), tf.float32)
    batch_size = tf.shape(pixels)[0]
    image, image_stats = _scale(pixels, scaling, IMAGE, batch_size)
    return {IMAGE: image, schemas.LABEL: inputs[schemas.LABEL], schemas.KEY: inputs[schemas.KEY], **image_stats}

  return preprocessing_fn


def sequence_preprocessing_fn(
  num_values: int,
  *,
  with_ids: bool = True,
  scaling: str = 'z_score',
  num_length_buckets: int = 4,
  vocab_top_k: int | None = None,
) -> Callable:
  """Raw sequence examples -> scaled `values_<i>`, vocabulary `ids`, `length_bucket`.

  Per-step outputs stay variable-length (SparseTensor [B, T] -> VarLen
  features); the training input pipeline (`DataConfig(kind='transformed',
  max_len=...)`) stacks them into [B, T, F] with a mask.
  """
  _check_scaling(scaling)
  if num_length_buckets < 2:
    raise ValueError(f'num_length_buckets must be >= 2, got {num_length_buckets}')

  def preprocessing_fn(inputs):
    import tensorflow as tf
    import tensorflow_transform as tft

    batch_size = tf.shape(inputs[schemas.KEY])[0]
    outputs = {schemas.KEY: inputs[schemas.KEY], schemas.LABEL: inputs[schemas.LABEL]}
    for i in range(num_values):
      column = schemas.value_column(i)
      outputs[column], column_stats = _scale(inputs[column], scaling, column, batch_size)
      outputs.update(column_stats)
    if with_ids:
      outputs[IDS] = tft.compute_and_apply_vocabulary(
        inputs[schemas.ITEM], top_k=vocab_top_k, num_oov_buckets=1, vocab_filename=ITEM_VOCABULARY
      )
    length = tf.cast(inputs[schemas.LENGTH], tf.float32)
    boundaries = tft.quantiles(length, num_length_buckets, epsilon=0.01)
    outputs[LENGTH_BUCKET] = tft.apply_buckets(length, boundaries)
    outputs.update(stats.broadcast({'length/boundaries': boundaries}, batch_size))
    outputs[schemas.LENGTH] = inputs[schemas.LENGTH]
    return outputs

  return preprocessing_fn
