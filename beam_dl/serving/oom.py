"""Out-of-memory recovery: split a batch that exhausts device memory.

XLA reports an allocation failure as a runtime error whose message starts
with RESOURCE_EXHAUSTED (`jax.errors.JaxRuntimeError`, formerly jaxlib's
XlaRuntimeError). Instead of failing the bundle (Beam issue 21447), the batch
is split in halves and each half retried, recursively, down to single
examples (`beam_dl.core.isolate`, split only on out-of-memory); an example that
fails alone re-raises, so only it becomes a dead letter (see
transforms.inference.RunInferenceWithDeadLetters).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from beam_dl.core.isolate import isolate

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
) -> list:
  """fn(batch) as a list of per-example outputs, or on RESOURCE_EXHAUSTED fn
  on each half, joined in order.

  `on_split(size)` is called for every batch that had to be split (for an
  'oom_splits' counter). Errors other than out-of-memory propagate unchanged,
  and so does out-of-memory on a single example.
  """

  def split(size: int) -> None:
    _log.warning('out of device memory on a batch of %d; retrying as two halves', size)
    on_split(size)

  return isolate(fn, batch, splits=is_resource_exhausted, raise_alone=True, on_split=split)
