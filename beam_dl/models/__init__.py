"""Flax models served and trained by beam_dl, built by registry name."""

from beam_dl.models import (
  cnn,  # noqa: F401  (registers models)
  linear,  # noqa: F401  (registers models)
  resnet,  # noqa: F401  (registers models)
  rnn,  # noqa: F401  (registers models)
)
from beam_dl.models.registry import build, names, register

__all__ = ['build', 'names', 'register']
