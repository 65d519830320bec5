"""Sequences in memory: `SequenceRecord`, and how their parsing fails.

A sequence is a `SequenceRecord`: a key, a [T, F] float32 array of per-step
values, optional [T] int64 categorical ids, and an optional class `label` or
regression `target`. Its on-disk format (the tf.train.SequenceExample with
context `key`/`label`/`target` and feature lists `values`/`ids`, and the flat
list-feature Example) lives in `beam_dl.formats.sequence_example`, which
parses batches through `_isolating` here: a batch that TensorFlow rejects
(bad bytes, wrong types) is split in halves until the bad records are
isolated, so one bad record costs O(log n) extra parses and never the batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from beam_dl.core.isolate import Failed, isolate


def _tf():
  """TensorFlow, imported on first use (keeps `import beam_dl` light).

  No module global is cached: after the first import this is a dict lookup
  in sys.modules, and module state stays the same on every worker.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


class SequenceParseError(ValueError):
  """A record that cannot become a `SequenceRecord`; the message is the reason."""


@dataclasses.dataclass(eq=False)
class SequenceRecord:
  """One variable-length sequence and its context.

  Attributes:
    key: the sequence's id (user, session, sensor...).
    values: float32 [T, F] per-step features.
    ids: optional int64 [T] categorical ids (item ids), aligned with values.
    label: optional int class index.
    target: optional float regression target (float32 vector for several).
    meta: free-form metadata carried along (source path, chunk index...).
  """

  key: str
  values: np.ndarray
  ids: np.ndarray | None = None
  label: int | None = None
  target: float | np.ndarray | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def length(self) -> int:
    return int(self.values.shape[0])

  def replace(self, **changes) -> 'SequenceRecord':
    return dataclasses.replace(self, **changes)

  def __eq__(self, other):
    if not isinstance(other, SequenceRecord):
      return NotImplemented
    return (
      self.key == other.key
      and self.label == other.label
      and np.array_equal(
        np.asarray(self.target, object if self.target is None else float),
        np.asarray(other.target, object if other.target is None else float),
      )
      and _same_meta(self.meta, other.meta)
      and np.array_equal(self.values, other.values)
      and (
        (self.ids is None and other.ids is None)
        or (self.ids is not None and other.ids is not None and np.array_equal(self.ids, other.ids))
      )
    )

  def __repr__(self):
    return (
      f'SequenceRecord(key={self.key!r}, values={self.values.tolist()!r}, '
      f'ids={None if self.ids is None else self.ids.tolist()!r}, '
      f'label={self.label!r}, target={self.target!r}, meta={dict(self.meta)!r})'
    )


def _same_meta(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  if set(a) != set(b):
    return False
  for k in a:
    x, y = a[k], b[k]
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      if not np.array_equal(np.asarray(x), np.asarray(y)):
        return False
    elif x != y:
      return False
  return True


_TF_NOISE = re.compile(r'^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]$')


def tf_error_message(err: Exception) -> str:
  """TensorFlow's own message without the op-name decoration."""
  msg = getattr(err, 'message', None) or str(err)
  return _TF_NOISE.sub('', msg).replace('Name: <unknown>, ', '').strip()


def _isolating(parse_batch: Callable[[list[bytes]], list], records: list[bytes], what: str) -> list:
  """`parse_batch(records)`, splitting the batch until TF's errors are isolated
  (`beam_dl.core.isolate`); a record TF rejects alone gets its own parse error."""
  op_error = _tf().errors.OpError  # InvalidArgument (types, bad bytes), DataLoss, ...
  outcomes = isolate(parse_batch, records, splits=lambda e: isinstance(e, op_error))
  return [
    SequenceParseError(f'cannot parse {what}: {tf_error_message(o.error)}') if isinstance(o, Failed) else o
    for o in outcomes
  ]


def results_by_kind(results: Iterable) -> tuple[list[SequenceRecord], list[SequenceParseError]]:
  """Split parse results into (records, errors)."""
  ok, bad = [], []
  for r in results:
    (bad if isinstance(r, SequenceParseError) else ok).append(r)
  return ok, bad
