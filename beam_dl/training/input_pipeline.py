"""tf.data input pipeline over the TFRecord shards the Beam pipelines write.

Formats (`beam_dl.formats`, see docs/training.md): image tf.train.Examples
with `image/raw` (uint8 HWC bytes), `image/shape`, `label`, `key`; sequence
tf.train.SequenceExamples with context `key`, `label` (int) or `target`
(float), feature lists `values` (F floats per step) and optional `ids`.

Batches are dicts of numpy arrays: `inputs` (raw dtype: scaling happens in
the jitted step, as in serving), `label` or `target`, `mask` for sequences,
and `weight` (1 real, 0 padding). Training batches are shuffled with a fixed
seed and repeat forever, so batch k is the same in every run: a resumed run
skips the batches it already consumed and continues bit-for-bit.

In a multi-process run each process yields only its own part of the global
batch (`DataConfig.process_split`): from its own subset of the files, or its
slice of a global batch that every process reads alike;
`sharding.shard_batch` assembles the global arrays.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from beam_dl.formats import image_example, sequence_example
from beam_dl.training.config import DataConfig

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


@functools.cache
def keep_tensorflow_on_host() -> None:
  """Hides the GPUs from TensorFlow, once, when an input pipeline is built.

  tf.data runs on the host; left alone TensorFlow would take the GPUs' memory
  that JAX trains with. Done here rather than at import, so importing this
  module changes nothing for a process that uses TensorFlow otherwise. Once
  TensorFlow has initialised its devices (it ran something earlier in this
  process) the setting can no longer change, and it stays as it was.
  """
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as e:  # devices already initialised
    log.debug('TensorFlow devices already set up: %s', e)


def _files(pattern: str, process_index: int, process_count: int) -> list[str]:
  files = sorted(tf.io.gfile.glob(pattern)) if pattern else []
  if not files:
    raise FileNotFoundError(f'no TFRecord files match {pattern!r}')
  if process_count > 1:
    if len(files) < process_count:
      raise ValueError(f'{len(files)} files for {process_count} processes: write at least one shard per process')
    files = files[process_index::process_count]
  return files


def _image_parser(cfg: DataConfig):
  shape = tuple(int(d) for d in cfg.shape)

  def parse(serialized):
    f = image_example.parse_pixels(serialized, shape)
    return {
      'inputs': f['image'],
      'label': tf.cast(f['label'], tf.int32),
      'weight': tf.ones_like(f['label'], tf.float32),
    }

  return parse


def _sequence_parser(cfg: DataConfig, use_ids: bool):
  num_features = int(cfg.shape[-1]) - (1 if use_ids else 0)
  max_len = int(cfg.max_len)

  def parse(serialized):
    f = sequence_example.parse_single(
      serialized, num_features, with_ids=use_ids, target=cfg.target, num_targets=cfg.num_targets
    )
    parts = []
    if use_ids:
      parts.append(tf.cast(f[sequence_example.IDS], tf.float32))
    if num_features:
      parts.append(f[sequence_example.VALUES])
    x = tf.concat(parts, axis=-1)[-max_len:]  # keep the most recent steps
    length = tf.shape(x)[0]
    x = tf.pad(x, [[0, max_len - length], [0, 0]])
    out = {
      'inputs': tf.ensure_shape(x, (max_len, int(cfg.shape[-1]))),
      'mask': tf.sequence_mask(length, max_len),
      'weight': tf.constant(1.0),
    }
    if cfg.target == 'label':
      out['label'] = tf.cast(f[sequence_example.LABEL], tf.int32)
    else:
      out['target'] = f[sequence_example.TARGET]
    return out

  return parse


def transformed_feature_spec(transform_dir: str) -> dict:
  """The tf.io feature spec of the records `pipelines.preprocess` wrote with
  `transform_dir`: tf.Transform's `transformed_feature_spec()` without the
  broadcast `stats/` features (which the records do not hold)."""
  import tensorflow_transform as tft

  from beam_dl.preprocessing import stats

  return stats.drop(tft.TFTransformOutput(transform_dir).transformed_feature_spec())


def _transformed_parser(cfg: DataConfig):
  """Batched parser of tf.Transform output: `cfg.features` -> `inputs`,
  `cfg.label_feature` -> `label` (int32) or `target` (float32 [num_targets]).

  Fixed-length features are concatenated and reshaped to `cfg.shape`;
  per-step features (`cfg.max_len` > 0, VarLen in the spec) are stacked into
  [T, F], cut to the most recent `max_len` steps, zero-padded, and masked.
  """
  if not cfg.transform_dir or not cfg.features:
    raise ValueError("DataConfig(kind='transformed') needs transform_dir and features")
  spec = transformed_feature_spec(cfg.transform_dir)
  wanted = {name: spec.get(name) for name in (*cfg.features, cfg.label_feature)}
  missing = sorted(name for name, feature in wanted.items() if feature is None)
  if missing:
    raise ValueError(f'{cfg.transform_dir} has no transformed feature {missing}; it has {sorted(spec)}')
  spec = {name: spec[name] for name in wanted}
  max_len, per_step = int(cfg.max_len), cfg.max_len > 0
  if per_step and int(cfg.shape[-1]) != len(cfg.features):
    raise ValueError(f'shape {tuple(cfg.shape)} does not end in the {len(cfg.features)} per-step features')
  if not per_step:
    shape = tuple(int(d) for d in cfg.shape)
    sizes = [int(np.prod(spec[name].shape)) if hasattr(spec[name], 'shape') else None for name in cfg.features]
    if None in sizes or sum(sizes) != int(np.prod(shape)):
      raise ValueError(
        f'features {list(cfg.features)} ({sizes} values) do not fill shape {shape}; '
        'variable-length features need max_len > 0'
      )

  def parse(serialized):
    f = tf.io.parse_example(serialized, spec)
    if per_step:
      columns = [tf.cast(tf.RaggedTensor.from_sparse(f[name]), tf.float32) for name in cfg.features]
      x = tf.concat([c[..., tf.newaxis] for c in columns], axis=-1)[:, -max_len:]  # most recent steps
      out = {
        'inputs': x.to_tensor(0.0, shape=[None, max_len, len(columns)]),
        'mask': tf.sequence_mask(x.row_lengths(), max_len),
      }
    else:
      flat = [tf.reshape(tf.cast(f[name], tf.float32), [tf.shape(serialized)[0], -1]) for name in cfg.features]
      out = {'inputs': tf.reshape(tf.concat(flat, axis=-1), (-1,) + shape)}
    label = f[cfg.label_feature]
    if cfg.target == 'label':
      out['label'] = tf.reshape(tf.cast(label, tf.int32), [-1])
    else:
      out['target'] = tf.reshape(tf.cast(label, tf.float32), [-1, cfg.num_targets])
    out['weight'] = tf.ones(tf.shape(serialized), tf.float32)
    out['weight'].set_shape(serialized.shape)
    return out

  return parse


def transformed_examples(transform_dir: str, pattern: str, key: str = 'key') -> dict[str, dict[str, np.ndarray]]:
  """Every transformed example as {key: {feature: array}}, variable-length
  features unpadded: for checks and small data sets, with the same feature
  spec the training batches are parsed with."""
  spec = transformed_feature_spec(transform_dir)

  def parse(serialized):
    f = tf.io.parse_single_example(serialized, spec)
    return {name: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for name, v in f.items()}

  ds = tf.data.TFRecordDataset(_files(pattern, 0, 1)).map(parse)
  return {row[key].decode('utf-8'): row for row in ds.as_numpy_iterator()}


def make_dataset(
  cfg: DataConfig,
  pattern: str,
  batch_size: int,
  *,
  train: bool,
  seed: int = 0,
  skip_batches: int = 0,
  use_ids: bool = False,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """A tf.data pipeline of this process's batches.

  Args:
    cfg: what an example looks like.
    pattern: glob of TFRecord files.
    batch_size: examples per batch on THIS process.
    train: shuffle + repeat forever + drop the remainder; else one pass.
    seed: shuffle seed; batch k is a function of (files, seed, k) only.
    skip_batches: batches already consumed (resuming at step k skips k).
    use_ids: sequences carry item ids, fed to the model as feature 0.
  """
  keep_tensorflow_on_host()
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if cfg.process_split not in ('files', 'batch'):
    raise ValueError(f"DataConfig.process_split must be 'files' or 'batch', got {cfg.process_split!r}")
  by_batch = cfg.process_split == 'batch' and pc > 1
  ds = tf.data.TFRecordDataset(_files(pattern, 0, 1) if by_batch else _files(pattern, pi, pc))
  if train:
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()

  def batched(ds):
    """Batches of this process's records, the first `skip_batches` skipped."""
    if by_batch:  # the global batch, of which this process keeps its slice
      ds = ds.batch(batch_size * pc, drop_remainder=train)
      ds = ds.map(lambda records: records[pi * batch_size : (pi + 1) * batch_size])
    else:
      ds = ds.batch(batch_size, drop_remainder=train)
    return ds.skip(skip_batches) if skip_batches else ds

  if cfg.kind == 'images':
    ds = batched(ds)
    ds = ds.map(_image_parser(cfg), num_parallel_calls=AUTOTUNE, deterministic=True)
  elif cfg.kind == 'sequences':
    if not cfg.max_len:
      raise ValueError('sequence data needs DataConfig.max_len')
    ds = batched(ds).unbatch().map(_sequence_parser(cfg, use_ids), num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=train)
  elif cfg.kind == 'transformed':
    ds = batched(ds)
    ds = ds.map(_transformed_parser(cfg), num_parallel_calls=AUTOTUNE, deterministic=True)
  else:
    raise ValueError(f"DataConfig.kind must be 'images', 'sequences' or 'transformed', got {cfg.kind!r}")
  return ds.prefetch(AUTOTUNE)


def pad_batch(batch: dict, batch_size: int) -> dict:
  """Pads a short (last eval) batch to `batch_size` with weight-0 examples."""
  n = len(batch['weight'])
  if n == batch_size:
    return batch
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterator[dict], put, size: int = 2) -> Iterator:
  """Keeps `size` batches already transferred to the devices ahead of the step.

  `put` turns a host batch into device arrays (e.g. `sharding.shard_batch`);
  the transfer of batch k+1.. overlaps the step on batch k.
  """
  queue = collections.deque()
  batches = iter(batches)
  for b in itertools.islice(batches, size):
    queue.append(put(b))
  while queue:
    yield queue.popleft()
    for b in itertools.islice(batches, 1):
      queue.append(put(b))
