"""tf.data input pipeline over the TFRecord shards the Beam pipelines write.

Formats (`beam_dl.formats`, see docs/training.md): image tf.train.Examples
with `image/raw` (uint8 HWC bytes), `image/shape`, `label`, `key`; sequence
tf.train.SequenceExamples with context `key`, `label` (int) or `target`
(float), feature lists `values` (F floats per step) and optional `ids`.

Batches are dicts of numpy arrays: `inputs` (raw dtype: scaling happens in
the jitted step, as in serving), `label` or `target`, `mask` for sequences,
and `weight` (1 real, 0 padding). Training batches are shuffled with a fixed
seed and repeat forever, so batch k is the same in every run: a resumed run
skips the batches it already consumed and continues bit-for-bit. Each
process reads only its own subset of the files (multi-host).
"""
from __future__ import annotations

import collections
import itertools
import logging
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from beam_dl.formats import image_example, sequence_example
from beam_dl.training.config import DataConfig

# The input pipeline is host-side only: keep TensorFlow off the accelerators.
tf.config.set_visible_devices([], 'GPU')

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


def _files(pattern: str, process_index: int, process_count: int) -> list[str]:
  files = sorted(tf.io.gfile.glob(pattern)) if pattern else []
  if not files:
    raise FileNotFoundError(f'no TFRecord files match {pattern!r}')
  if process_count > 1:
    if len(files) < process_count:
      raise ValueError(
          f'{len(files)} files for {process_count} processes: write at least one shard per process'
      )
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
    f = sequence_example.parse_single(serialized, num_features, with_ids=use_ids,
                                      target=cfg.target, num_targets=cfg.num_targets)
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


def make_dataset(cfg: DataConfig, pattern: str, batch_size: int, *, train: bool,
                 seed: int = 0, skip_batches: int = 0, use_ids: bool = False,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
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
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  ds = tf.data.TFRecordDataset(_files(pattern, pi, pc))
  if train:
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  if cfg.kind == 'images':
    ds = ds.batch(batch_size, drop_remainder=train)
    if skip_batches:
      ds = ds.skip(skip_batches)
    ds = ds.map(_image_parser(cfg), num_parallel_calls=AUTOTUNE, deterministic=True)
  elif cfg.kind == 'sequences':
    if not cfg.max_len:
      raise ValueError('sequence data needs DataConfig.max_len')
    ds = ds.batch(batch_size, drop_remainder=train)
    if skip_batches:
      ds = ds.skip(skip_batches)
    ds = ds.unbatch().map(_sequence_parser(cfg, use_ids), num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=train)
  else:
    raise ValueError(f"DataConfig.kind must be 'images' or 'sequences', got {cfg.kind!r}")
  return ds.prefetch(AUTOTUNE)


def pad_batch(batch: dict, batch_size: int) -> dict:
  """Pads a short (last eval) batch to `batch_size` with weight-0 examples."""
  n = len(batch['weight'])
  if n == batch_size:
    return batch
  return {
      k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
      for k, v in batch.items()
  }


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
