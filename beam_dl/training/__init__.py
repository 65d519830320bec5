"""Sharded Flax training on the TFRecords beam_dl's pipelines write.

    from beam_dl.training import TrainConfig, train_and_evaluate
    summary = train_and_evaluate(config, workdir)   # exports workdir/model

Names are imported lazily so `beam_dl.training.quick` stays free of
TensorFlow. See docs/training.md.
"""

import importlib

_EXPORTS = {
  'DataConfig': 'beam_dl.training.config',
  'ShardingConfig': 'beam_dl.training.config',
  'TrainConfig': 'beam_dl.training.config',
  'train_and_evaluate': 'beam_dl.training.trainer',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
