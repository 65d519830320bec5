"""Out-of-memory recovery: split a batch that exhausts device memory.

XLA reports an allocation failure as a runtime error whose message starts
with RESOURCE_EXHAUSTED (`jax.errors.JaxRuntimeError`, formerly jaxlib's
XlaRuntimeError). Instead of failing the bundle (Beam issue 21447), the batch
is split in halves and each half retried, recursively, down to single
examples; an example that fails alone re-raises, so only it becomes a dead
letter (see transforms.inference.RunInferenceWithDeadLetters).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

_log = logging.getLogger(__name__)
OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')


def is_resource_exhausted(error: BaseException) -> bool:
  """True for an XLA/accelerator out-of-memory error (any runtime error that
  says RESOURCE_EXHAUSTED or out of memory), also after crossing a process
  boundary, where only the type's base and message survive."""
  return isinstance(error, (RuntimeError, MemoryError)) and any(m in str(error) for m in OOM_MARKERS)


def call_with_oom_split(
    fn: Callable[[Sequence], Sequence],
    batch: Sequence,
    on_split: Callable[[int], None] = lambda size: None,
) -> Sequence:
  """fn(batch), or on RESOURCE_EXHAUSTED fn on each half, joined in order
  (concatenated when fn returns arrays, else as a list).

  `on_split(size)` is called for every batch that had to be split (for an
  'oom_splits' counter). Errors other than out-of-memory propagate unchanged.
  """
  try:
    return fn(batch)
  except Exception as e:  # only OOM is handled; everything else re-raises
    if not is_resource_exhausted(e) or len(batch) <= 1:
      raise
    _log.warning('out of device memory on a batch of %d; retrying as two halves', len(batch))
    on_split(len(batch))
  middle = len(batch) // 2
  first = call_with_oom_split(fn, batch[:middle], on_split)
  second = call_with_oom_split(fn, batch[middle:], on_split)
  if isinstance(first, np.ndarray) and isinstance(second, np.ndarray):
    return np.concatenate([first, second], axis=0)
  return [*first, *second]
