"""Calibration inputs for static int8 activation scales, as served inputs:
a sample of TFRecords read by the training input pipeline (the training
files a model dir records, by default), or of image files decoded as
`ClassifyImages` decodes what it serves."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np

from beam_dl.training.config import DataConfig

_log = logging.getLogger(__name__)


class CalibrationError(ValueError):
  """Calibration data that is missing, unreadable or empty."""


def data_config(spec, pattern: str = '') -> tuple[DataConfig, str, bool]:
  """(DataConfig, file pattern, use_ids) for a model dir's spec: the training
  config stored in `spec.extra['config']` when there is one (trainer-written
  dirs), else the spec's own input shape; `pattern` overrides the files."""
  stored: Mapping[str, Any] = (spec.extra or {}).get('config', {}) or {}
  data = dict(stored.get('data') or {})
  known = {f.name for f in dataclasses.fields(DataConfig)}
  cfg = (
    DataConfig(**{k: v for k, v in data.items() if k in known})
    if data
    else DataConfig(
      kind='sequences' if spec.is_sequence else 'images',
      shape=tuple(spec.input_shape),
      max_len=64 if spec.is_sequence else 0,
    )
  )
  pattern = pattern or cfg.train_files
  if not pattern:
    raise CalibrationError('no calibration data: pass --calibration PATTERN (the model dir records no training files)')
  use_ids = bool((stored.get('model_kwargs') or spec.kwargs).get('vocab_size'))
  return cfg, pattern, use_ids


def calibration_batches(
  cfg: DataConfig, pattern: str, examples: int = 256, *, batch_size: int = 128, use_ids: bool = False
) -> list[tuple[np.ndarray, ...]]:
  """Up to `examples` examples from `pattern` as model inputs: [(x,) or (x, mask)]."""
  import tensorflow as tf

  from beam_dl.training import input_pipeline

  out, seen = [], 0
  try:
    ds = input_pipeline.make_dataset(cfg, pattern, min(batch_size, examples), train=False, use_ids=use_ids)
    for b in ds.as_numpy_iterator():
      take = min(len(b['inputs']), examples - seen)
      out.append((b['inputs'][:take], b['mask'][:take]) if 'mask' in b else (b['inputs'][:take],))
      seen += take
      if seen >= examples:
        break
  except (FileNotFoundError, tf.errors.OpError) as e:  # no match, a damaged record, a feature of another shape
    raise CalibrationError(f'{pattern}: {getattr(e, "message", None) or e}') from None
  if not out:
    raise CalibrationError(f'{pattern}: no examples to calibrate on')
  return out


def image_batches(spec, pattern: str, examples: int = 256, *, batch_size: int = 128) -> list[tuple[np.ndarray]]:
  """Up to `examples` image files of `pattern` (a glob or an `@` file list,
  as `classify_images --input`) as model inputs [(x,)]: decoded to the
  model's [H, W, C] uint8 input by `decode_image`, as `ClassifyImages` serves
  them. Files that are not images are skipped and counted in one log line;
  CalibrationError when none decodes."""
  from apache_beam.io.filesystems import FileSystems

  from beam_dl.decoding.images import ImageDecodeError, ImageSpec, decode_image
  from beam_dl.io import files

  if len(spec.input_shape) != 3:
    raise CalibrationError(f'model input {list(spec.input_shape)} is not an image [H, W, C]')
  height, width, channels = spec.input_shape
  image_spec = ImageSpec(height=height, width=width, channels=channels)
  images, skipped = [], {}
  try:
    for path in files.iter_inputs(pattern):
      local = FileSystems.get_scheme(path) is None
      reason = 'unreadable' if local and files.not_regular_reason(path) else None
      if reason is None:
        try:
          with FileSystems.open(path, compression_type='uncompressed') as f:
            images.append(decode_image(f.read(), image_spec))
        except ImageDecodeError as e:
          reason = e.kind
        except files.READ_ERRORS:
          reason = 'unreadable'
      if reason is not None:
        skipped[reason] = skipped.get(reason, 0) + 1
      if len(images) >= examples:
        break
  except OSError as e:  # an unreadable file list or directory
    raise CalibrationError(f'{pattern}: {e}') from None
  if not images:
    raise CalibrationError(f'{pattern}: no image file to calibrate on' + (f' (skipped: {skipped})' if skipped else ''))
  if skipped:
    _log.warning(
      'calibration: skipped %d of %d files of %s that are not images: %s',
      sum(skipped.values()),
      len(images) + sum(skipped.values()),
      pattern,
      skipped,
    )
  x = np.stack(images)
  return [(x[i : i + batch_size],) for i in range(0, len(x), batch_size)]
