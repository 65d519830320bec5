"""tf.data over the transformed TFRecords that `pipelines.preprocess` writes.

The feature spec comes from the transform directory itself
(`TFTransformOutput.transformed_feature_spec()`, minus the `stats/` features),
so training reads exactly the features the saved graph produces at serving.
Batches are dicts of numpy arrays; variable-length per-step features
(`values_<i>`, `ids`) come back dense, padded with 0; `model_inputs` stacks
them into [B, T, F] with a boolean mask from `length`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from beam_dl.preprocessing import schemas, stats
from beam_dl.preprocessing import config as config_lib


def transformed_feature_spec(transform_dir: str) -> dict:
  """The tf.io feature spec of the transformed training records."""
  import tensorflow_transform as tft

  return stats.drop(tft.TFTransformOutput(transform_dir).transformed_feature_spec())


def make_dataset(
    transform_dir: str,
    file_pattern: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    repeat: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
):
  """A tf.data.Dataset of parsed, densified batches of transformed examples."""
  import tensorflow as tf

  files = sorted(tf.io.gfile.glob(file_pattern))
  if not files:
    raise FileNotFoundError(f'no files match {file_pattern!r}')
  spec = transformed_feature_spec(transform_dir)
  dataset = tf.data.TFRecordDataset(files)
  if shuffle:
    dataset = dataset.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    dataset = dataset.repeat()
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)

  def parse(serialized):
    parsed = tf.io.parse_example(serialized, spec)
    out = {}
    for name, value in parsed.items():
      if isinstance(value, tf.SparseTensor):
        out[name] = tf.sparse.to_dense(value)
      else:
        out[name] = value
    return out

  return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def iterate_batches(transform_dir: str, file_pattern: str, batch_size: int, **kwargs) -> Iterator[dict]:
  """Batches as dicts of numpy arrays, with model inputs assembled:
  images: `image` float32 [B, H, W, C]; sequences: `values` float32 [B, T, F]
  and `mask` bool [B, T] (+ `ids` int64 [B, T] when present)."""
  config = config_lib.load(transform_dir)
  for batch in make_dataset(transform_dir, file_pattern, batch_size, **kwargs).as_numpy_iterator():
    yield model_inputs(batch, config)


def model_inputs(batch: dict, config) -> dict:
  """Parsed transformed batch -> model-shaped arrays for `config`'s kind."""
  out = dict(batch)
  if config.kind == 'images':
    out['image'] = np.asarray(batch['image'], np.float32).reshape(-1, *config.image_shape)
    return out
  columns = [np.asarray(batch[schemas.value_column(i)], np.float32) for i in range(config.num_values)]
  out['values'] = np.stack(columns, axis=-1)
  lengths = np.asarray(batch[schemas.LENGTH]).reshape(-1)
  out['mask'] = np.arange(out['values'].shape[1])[None, :] < lengths[:, None]
  for i in range(config.num_values):
    out.pop(schemas.value_column(i))
  return out


def read_all(transform_dir: str, file_pattern: str) -> dict[str, dict]:
  """Every transformed example as {key: {feature: array}} (unpadded), for checks
  and small data sets."""
  config = config_lib.load(transform_dir)
  records = {}
  for batch in make_dataset(transform_dir, file_pattern, 256).as_numpy_iterator():
    for i, key in enumerate(batch[schemas.KEY]):
      row = {name: value[i] for name, value in batch.items()}
      if config.kind == 'sequences':
        length = int(row[schemas.LENGTH])
        for name in list(row):
          if name.startswith('values_') or name == 'ids':
            row[name] = row[name][:length]
      records[key.decode('utf-8')] = row
  return records
