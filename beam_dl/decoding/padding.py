"""Padding, truncation, length buckets and fixed windows for sequences.

Batches for the JAX handler and the RNN models are [B, T, F] values with a
[B, T] bool mask (True on real steps). T is a *length bucket* (one of a few
boundaries) so jit compiles a handful of shapes, and sequences of similar
length share a batch so little compute goes to padding.

Truncation and padding follow Keras' `pad_sequences` semantics ('pre' keeps
the end / pads in front, 'post' keeps the start / pads behind); they are done
here in numpy because the mask and the ids must be padded the same way.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterable, Sequence

import numpy as np

from beam_dl.decoding.sequences import SequenceRecord

_SIDES = ('pre', 'post')


def _check_side(name: str, side: str) -> None:
  if side not in _SIDES:
    raise ValueError(f'{name} must be "pre" or "post", got {side!r}')


def _slice_meta(record: SequenceRecord, sl: slice) -> dict:
  """Meta with per-step arrays (e.g. event `times`) sliced like the values."""
  return {k: (v[sl] if isinstance(v, np.ndarray) and len(v) == record.length else v) for k, v in record.meta.items()}


def truncate(record: SequenceRecord, max_length: int, side: str = 'pre') -> SequenceRecord:
  """At most `max_length` steps; 'pre' drops the oldest steps, 'post' the newest."""
  _check_side('truncating', side)
  if record.length <= max_length:
    return record
  sl = slice(record.length - max_length, None) if side == 'pre' else slice(0, max_length)
  return record.replace(
    values=record.values[sl], ids=None if record.ids is None else record.ids[sl], meta=_slice_meta(record, sl)
  )


def pad_array(x: np.ndarray, length: int, side: str = 'post', value=0) -> np.ndarray:
  """`x` ([T, ...]) padded along axis 0 to `length` (T <= length)."""
  _check_side('padding', side)
  extra = length - x.shape[0]
  if extra < 0:
    raise ValueError(f'cannot pad {x.shape[0]} steps to {length}; truncate first')
  width = [(extra, 0) if side == 'pre' else (0, extra)] + [(0, 0)] * (x.ndim - 1)
  return np.pad(x, width, constant_values=value)


@dataclasses.dataclass(eq=False)
class PaddedBatch:
  """A padded batch: what the JAX handler / RNN models consume.

  Attributes:
    keys: B keys.
    values: float32 [B, T, F].
    mask: bool [B, T], True on real steps.
    ids: int64 [B, T] (0 on padding) or None.
    labels: int64 [B] (-1 where missing) or None when no record has a label.
    targets: float32 [B] (or [B, K] for K targets; nan where missing) or None.
    lengths: int32 [B] true lengths after truncation.
  """

  keys: list[str]
  values: np.ndarray
  mask: np.ndarray
  ids: np.ndarray | None
  labels: np.ndarray | None
  targets: np.ndarray | None
  lengths: np.ndarray

  @property
  def padding_fraction(self) -> float:
    """Share of the [B, T] step slots that are padding."""
    return 1.0 - float(self.mask.mean()) if self.mask.size else 0.0


def pad_batch(
  records: Sequence[SequenceRecord], length: int | None = None, padding: str = 'post', truncating: str = 'pre'
) -> PaddedBatch:
  """Stack records into a `PaddedBatch` of `length` steps (default: the longest)."""
  _check_side('padding', padding)
  if not records:
    raise ValueError('pad_batch needs at least one record')
  if length is None:
    length = max(r.length for r in records)
  recs = [truncate(r, length, truncating) for r in records]
  widths = {r.values.shape[1] for r in recs}
  if len(widths) != 1:
    raise ValueError(f'records have different feature widths {sorted(widths)}')
  values = np.stack([pad_array(r.values, length, padding) for r in recs]).astype(np.float32)
  lengths = np.asarray([r.length for r in recs], np.int32)
  steps = np.arange(length)
  if padding == 'post':
    mask = steps[None, :] < lengths[:, None]
  else:
    mask = steps[None, :] >= (length - lengths)[:, None]
  has_ids = [r.ids is not None for r in recs]
  if any(has_ids) and not all(has_ids):
    raise ValueError('some records have ids and some do not')
  ids = np.stack([pad_array(r.ids, length, padding) for r in recs]).astype(np.int64) if all(has_ids) else None
  labels = (
    np.asarray([-1 if r.label is None else r.label for r in recs], np.int64)
    if any(r.label is not None for r in recs)
    else None
  )
  targets = None
  if any(r.target is not None for r in recs):
    width = next(np.size(r.target) for r in recs if r.target is not None)
    targets = np.stack(
      [
        np.full(width, np.nan, np.float32) if r.target is None else np.atleast_1d(np.asarray(r.target, np.float32))
        for r in recs
      ]
    )
    targets = targets[:, 0] if width == 1 else targets
  return PaddedBatch([r.key for r in recs], values, mask, ids, labels, targets, lengths)


def bucket_index(length: int, boundaries: Sequence[int]) -> int:
  """Index of the smallest boundary >= length (the last one for longer sequences).

  Boundaries are the padded lengths of the buckets, strictly increasing; a
  sequence longer than the last boundary goes to the last bucket and is
  truncated to it.
  """
  return min(bisect.bisect_left(boundaries, length), len(boundaries) - 1)


def check_boundaries(boundaries: Sequence[int]) -> tuple[int, ...]:
  b = tuple(int(x) for x in boundaries)
  if not b or any(x < 1 for x in b) or any(x >= y for x, y in zip(b, b[1:])):
    raise ValueError(f'bucket boundaries must be positive and strictly increasing, got {boundaries}')
  return b


def default_boundaries(max_length: int, min_length: int = 8, factor: float = 2.0) -> tuple[int, ...]:
  """Geometric boundaries min_length, min_length*factor, ... up to max_length."""
  out, b = [], float(min_length)
  while b < max_length:
    out.append(int(b))
    b *= factor
  out.append(int(max_length))
  return check_boundaries(sorted(set(out)))


def chunk(
  record: SequenceRecord, window: int, stride: int | None = None, drop_remainder: bool = False
) -> list[SequenceRecord]:
  """Fixed windows of `window` steps for truncated backpropagation through time.

  Windows start every `stride` steps (default `window`: no overlap), in time
  order; the last, shorter window is kept unless `drop_remainder` (pad it with
  `pad_batch`, the mask marks the gap). Each chunk's meta holds
  `source_key`, `chunk` (index) and `num_chunks` so a trainer can carry RNN
  state across a key's chunks in order; chunk keys are '<key>/<index>'.
  """
  if window < 1:
    raise ValueError(f'window must be >= 1, got {window}')
  stride = stride or window
  if stride < 1:
    raise ValueError(f'stride must be >= 1, got {stride}')
  starts = list(range(0, max(record.length - window, 0) + 1, stride))
  if not drop_remainder and starts and starts[-1] + window < record.length:
    starts.append(starts[-1] + stride)
  if drop_remainder:
    starts = [s for s in starts if s + window <= record.length]
  out = []
  for i, s in enumerate(starts):
    sl = slice(s, s + window)
    out.append(
      record.replace(
        key=f'{record.key}/{i}',
        values=record.values[sl],
        ids=None if record.ids is None else record.ids[sl],
        meta={**_slice_meta(record, sl), 'source_key': record.key, 'chunk': i, 'num_chunks': len(starts), 'start': s},
      )
    )
  return out


def padding_fraction(lengths: Iterable[int], padded_to: Iterable[int]) -> float:
  """Share of padded step slots that are padding, over many sequences."""
  lengths = np.asarray(list(lengths), np.int64)
  padded = np.asarray(list(padded_to), np.int64)
  total = padded.sum()
  return float(1.0 - np.minimum(lengths, padded).sum() / total) if total else 0.0
