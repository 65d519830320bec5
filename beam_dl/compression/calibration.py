"""Calibration inputs for static int8 activation scales: a sample of the
training TFRecords, read by the training input pipeline, as served inputs."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from beam_dl.training.config import DataConfig


def data_config(spec, pattern: str = '') -> tuple[DataConfig, str, bool]:
  """(DataConfig, file pattern, use_ids) for a model dir's spec: the training
  config stored in `spec.extra['config']` when there is one (trainer-written
  dirs), else the spec's own input shape; `pattern` overrides the files."""
  stored: Mapping[str, Any] = (spec.extra or {}).get('config', {}) or {}
  data = dict(stored.get('data') or {})
  known = {f.name for f in dataclasses.fields(DataConfig)}
  cfg = DataConfig(**{k: v for k, v in data.items() if k in known}) if data else DataConfig(
      kind='sequences' if spec.is_sequence else 'images', shape=tuple(spec.input_shape),
      max_len=64 if spec.is_sequence else 0)
  pattern = pattern or cfg.train_files
  if not pattern:
    raise ValueError('no calibration data: pass --calibration PATTERN (the model dir records no training files)')
  use_ids = bool((stored.get('model_kwargs') or spec.kwargs).get('vocab_size'))
  return cfg, pattern, use_ids


def calibration_batches(cfg: DataConfig, pattern: str, examples: int = 256, *,
                        batch_size: int = 128, use_ids: bool = False) -> list[tuple[np.ndarray, ...]]:
  """Up to `examples` examples from `pattern` as model inputs: [(x,) or (x, mask)]."""
  from beam_dl.training import input_pipeline

  ds = input_pipeline.make_dataset(cfg, pattern, min(batch_size, examples), train=False, use_ids=use_ids)
  out, seen = [], 0
  for b in ds.as_numpy_iterator():
    take = min(len(b['inputs']), examples - seen)
    out.append((b['inputs'][:take], b['mask'][:take]) if 'mask' in b else (b['inputs'][:take],))
    seen += take
    if seen >= examples:
      break
  return out
