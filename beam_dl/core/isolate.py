"""Isolate the elements of a batch that a batch function rejects.

Batched work (a forward pass, TensorFlow's vectorised parsers, a saved
tf.Transform graph) fails the whole batch for one bad element. `isolate` runs
the function on the batch and, when it raises an error that the caller's
policy splits on, runs it on each half, recursively, down to single elements:
k bad elements in a batch of n cost O(k log n) extra calls, every good element
keeps its result and every bad one gets the error it raises alone. This is
the one home of that algorithm: out-of-memory recovery in the handler,
per-element inference dead letters, SequenceExample parsing and tf.Transform
serving all call it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Failed:
  """Stands in place of an element's result: the error it raised alone
  (its traceback dropped, so no frame -- and no batch -- is kept alive)."""

  error: BaseException


def any_error(error: BaseException) -> bool:
  """The default split policy: every `Exception` may be one bad element."""
  return isinstance(error, Exception)


def isolate(
  fn: Callable[[Sequence], Sequence],
  batch: Sequence,
  *,
  splits: Callable[[BaseException], bool] = any_error,
  raise_alone: bool = False,
  on_split: Optional[Callable[[int], None]] = None,
) -> list[Any]:
  """fn's results for `batch`, one per element and in order, with a `Failed`
  in place of each element that fails on its own.

  Args:
    fn: batch -> one result per element (a list, a tuple, an array's rows).
      A result count that differs from the batch size is an error of that call.
    batch: a sliceable sequence (list, tuple, array).
    splits: which errors split the batch; any other error propagates
      unchanged (a bug or an outage, not a bad element).
    raise_alone: re-raise the error of a single element instead of returning
      a `Failed` (for a caller that cannot use partial results, e.g. the
      handler's out-of-memory split under Beam's own dead-letter queue).
    on_split: called with the size of every batch that is split (a counter).
  """
  if len(batch) == 0:
    return []
  try:
    results = list(fn(batch))
    if len(results) != len(batch):
      raise ValueError(f'{len(results)} results for a batch of {len(batch)}')
    return results
  except Exception as e:  # pylint: disable=broad-except  # the policy decides
    if not splits(e) or (raise_alone and len(batch) == 1):
      raise
    if len(batch) == 1:
      return [Failed(e.with_traceback(None))]
  if on_split is not None:
    on_split(len(batch))
  middle = len(batch) // 2
  kwargs = dict(splits=splits, raise_alone=raise_alone, on_split=on_split)
  return isolate(fn, batch[:middle], **kwargs) + isolate(fn, batch[middle:], **kwargs)


def failures(outcomes: Sequence[Any]) -> int:
  """How many outcomes are `Failed` (for a counter)."""
  return sum(isinstance(o, Failed) for o in outcomes)
