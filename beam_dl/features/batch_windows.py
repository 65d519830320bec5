"""Windowed features in batch, vectorised: one Beam element per key block.

`WindowedFeatures` in streaming shape costs a Beam element, a window
assignment, a GroupByKey entry and a Python `WindowStats.add` per event.
In batch nothing is late and every window fires once, at the end of input,
so the same records can be computed by:

  1. events become `EventBlock`s, columnar (keys, event times in integer
     microseconds, values [N, F]): per bundle from one-element-per-event
     input (`_BlockEventsFn`: three list appends per event), or given as
     blocks by the source (`WindowedFeatures(spec, event_blocks=True)`; then no
     per-event Beam element exists at all);
  2. `split_by_key_block` cuts each block by key block (crc32(key) % blocks,
     stable across processes) and a GroupByKey on the block number brings a
     key block's pieces together (a few elements per bundle cross it, not
     one per event);
  3. `block_features`: numpy over the block's events: window starts from the
     timestamps (Beam's fixed/sliding assignment in integer microseconds),
     one lexsort by (key, window, time, values), `ufunc.reduceat` per group,
     then one `features_record` per key and window.

Outputs are the streaming path's records (same keys, windows, pane fields
and features; floating-point sums may differ in the last bits: numpy sums
pairwise, the streaming combiner by Welford/Chan updates). Only fixed and
sliding windows without early triggers take this path (`applies`); sessions
merge windows and early panes depend on processing time, so they stay on the
streaming path (blocks are then unpacked into timestamped `Event`s,
`unblock`).
"""

from __future__ import annotations

import typing
import zlib
from typing import Iterable, NamedTuple

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam.transforms import window as bw
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming, WindowedValue

from beam_dl.core.element_types import Record
from beam_dl.features.aggregates import features_record
from beam_dl.features.windows import WindowSpec, is_batch
from beam_dl.formats.events import Event

DEFAULT_BLOCKS = 64
# A batch GroupByKey fires each window once, when the input ends: the pane
# the streaming path's records carry in batch.
BATCH_PANE = ('ON_TIME', 0)
_ON_TIME = PaneInfo(is_first=True, is_last=True, timing=PaneInfoTiming.ON_TIME, index=0, nonspeculative_index=0)


class EventBlock(NamedTuple):
  """Events, columnar: keys [N] (str), micros [N] int64, values [N, F] float64.

  `micros` are the events' Beam timestamps (what `EventTimestamps` stamps),
  in microseconds; build blocks with `event_block` or `events_block`.
  """

  keys: np.ndarray
  micros: np.ndarray
  values: np.ndarray


def event_block(keys, times, values) -> EventBlock:
  """A block from keys [N], event times [N] in seconds and values [N, F].

  Times become microseconds as Beam's `Timestamp.of(seconds)` makes them
  (`int(seconds * 1e6)`, toward zero), so a block's windows are those of
  the same events stamped one by one.
  """
  keys = np.asarray(keys, dtype=object).reshape(-1)
  times = np.asarray(times, np.float64).reshape(-1)
  values = np.asarray(values, np.float64)
  if values.ndim == 1:
    values = values.reshape(len(values), 1)  # one value per event
  if not len(keys) == len(times) == len(values):
    raise ValueError(
      f'an event block needs as many keys, times and value rows; got {len(keys)}, {len(times)}, {len(values)}'
    )
  return EventBlock(keys, (times * 1e6).astype(np.int64), values)


def events_block(events: Iterable[Event]) -> EventBlock:
  """The block of `Event`s stamped with their own `time` (`EventTimestamps()`)."""
  events = list(events)
  return event_block([e.key for e in events], [e.time for e in events], [e.values for e in events])


def unblock(block: EventBlock) -> Iterable[beam.window.TimestampedValue]:
  """A block's events, one timestamped `Event` each (for the streaming path)."""
  for key, micros, values in zip(block.keys.tolist(), block.micros.tolist(), block.values.tolist()):
    yield beam.window.TimestampedValue(Event(key, micros / 1e6, tuple(values)), Timestamp(micros=micros))


def applies(spec: WindowSpec, pcoll: beam.PCollection) -> bool:
  """True when `pcoll` is bounded in a batch pipeline and `spec` is fixed or
  sliding without early firings (as run on `pcoll`: processing-time ones
  are dropped in batch): then every window fires exactly once."""
  spec = spec.as_run_on(pcoll)
  return (
    is_batch(pcoll)
    and spec.kind in ('fixed', 'sliding')
    and spec.early_after_secs is None
    and spec.early_after_count is None
  )


def block_of(key, blocks: int) -> int:
  """A key's block number, the same in every process (unlike hash())."""
  return zlib.crc32(str(key).encode('utf-8')) % blocks


def key_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(distinct keys, code per event): `names[codes] == keys`. A hash table
  (pandas.factorize), not np.unique's sort of Python strings (~20x slower)."""
  codes, names = pd.factorize(keys)
  return np.asarray(names, dtype=object), codes


def split_by_key_block(block: EventBlock, blocks: int) -> list[tuple[int, EventBlock]]:
  """(key block number, the block's events of that key block) per key block present."""
  if not len(block.keys):
    return []
  names, codes = key_codes(block.keys)
  numbers = np.fromiter((block_of(name, blocks) for name in names.tolist()), np.int64, len(names))[codes]
  order = np.argsort(numbers, kind='stable')
  cuts = np.flatnonzero(np.diff(numbers[order])) + 1
  return [
    (int(numbers[rows[0]]), EventBlock(block.keys[rows], block.micros[rows], block.values[rows]))
    for rows in np.split(order, cuts)
  ]


def window_starts(micros: np.ndarray, spec: WindowSpec) -> tuple[np.ndarray, np.ndarray, int]:
  """(event index, window start micros) per (event, window) and the window
  length in micros, as Beam's FixedWindows / SlidingWindows assign them."""
  size = int(bw.Duration.of(spec.size).micros)
  period = size if spec.kind == 'fixed' else int(bw.Duration.of(spec.period).micros)
  last_start = micros - micros % period
  per_event = -(-size // period)  # windows an event can fall in
  index = np.repeat(np.arange(len(micros)), per_event)
  starts = np.repeat(last_start, per_event) - np.tile(np.arange(per_event) * period, len(micros))
  inside = starts > np.repeat(micros, per_event) - size  # start <= t < start + size
  return index[inside], starts[inside], size


def block_features(block: EventBlock, spec: WindowSpec) -> list[WindowedValue]:
  """The features record of every key and window of the block's events, each
  in its window with the timestamp and ON_TIME pane a batch GroupByKey gives
  the streaming path's."""
  if not len(block.micros):
    return []
  names, codes = key_codes(block.keys)
  index, starts, size = window_starts(block.micros, spec)
  codes, micros, values = codes[index], block.micros[index], block.values[index]
  # Within a (key, window) group: by time, ties by the value tuple, so the
  # group's last row is the streaming path's "last" (greatest time, then values).
  order = np.lexsort(tuple(values[:, ::-1].T) + (micros, starts, codes))
  codes, starts, micros, values = codes[order], starts[order], micros[order], values[order]
  first = np.flatnonzero(np.r_[True, (codes[1:] != codes[:-1]) | (starts[1:] != starts[:-1])])
  count = np.diff(np.r_[first, len(codes)])
  mean = np.add.reduceat(values, first, axis=0) / count[:, None]
  m2 = np.add.reduceat((values - np.repeat(mean, count, axis=0)) ** 2, first, axis=0)
  last = first + count - 1
  # Whole columns to Python lists once; the loop below only indexes lists.
  columns = zip(
    names[codes[first]].tolist(),
    starts[first].tolist(),
    count.tolist(),
    (mean * count[:, None]).tolist(),
    mean.tolist(),
    np.sqrt(np.maximum(m2, 0.0) / count[:, None]).tolist(),
    np.minimum.reduceat(values, first, axis=0).tolist(),
    np.maximum.reduceat(values, first, axis=0).tolist(),
    values[last].tolist(),
    (micros[first] / 1e6).tolist(),
    (micros[last] / 1e6).tolist(),
  )
  pane, pane_index = BATCH_PANE
  windows = {}  # start -> (window, its max timestamp): keys share windows
  records = []
  for key, start, n, total, avg, std, lo, hi, last_values, first_time, last_time in columns:
    features = {
      'count': n,
      'sum': total,
      'mean': avg,
      'std': std,
      'min': lo,
      'max': hi,
      'last': last_values,
      'first_time': first_time,
      'last_time': last_time,
    }
    window = windows.get(start)
    if window is None:
      interval = bw.IntervalWindow(Timestamp(micros=start), Timestamp(micros=start + size))
      window = windows[start] = ([interval], interval.max_timestamp())
    records.append(
      WindowedValue(
        features_record(key, start / 1e6, (start + size) / 1e6, features, pane, pane_index),
        window[1],
        window[0],
        _ON_TIME,
      )
    )
  return records


def merge_blocks(blocks: Iterable[EventBlock]) -> EventBlock:
  blocks = list(blocks)
  return EventBlock(*(np.concatenate([getattr(b, field) for b in blocks]) for field in EventBlock._fields))


class _BlockEventsFn(beam.DoFn):
  """Event -> (key block, EventBlock) per bundle and key block: per-event
  work is three list appends; arrays are built once in finish_bundle."""

  def __init__(self, blocks: int):
    self._blocks = blocks

  def start_bundle(self):
    self._keys, self._micros, self._values = [], [], []

  def process(self, event, timestamp=beam.DoFn.TimestampParam):
    self._keys.append(event.key)
    self._micros.append(timestamp.micros)
    self._values.append(event.values)

  def finish_bundle(self):
    if self._keys:
      block = EventBlock(
        np.asarray(self._keys, dtype=object),
        np.asarray(self._micros, np.int64),
        np.asarray(self._values, np.float64).reshape(len(self._keys), -1),
      )
      for piece in split_by_key_block(block, self._blocks):
        yield bw.GlobalWindows.windowed_value(piece)
    self.start_bundle()


class _SplitBlocksFn(beam.DoFn):
  """EventBlock -> (key block, EventBlock) per key block present."""

  def __init__(self, blocks: int):
    self._blocks = blocks

  def process(self, block: EventBlock):
    yield from split_by_key_block(block, self._blocks)


class _BlockFeaturesFn(beam.DoFn):
  """(block, [EventBlock]) -> windowed features records (`block_features`)."""

  def __init__(self, spec: WindowSpec):
    self._spec = spec

  def process(self, element):
    _, blocks = element
    return block_features(merge_blocks(blocks), self._spec)


@beam.typehints.with_input_types(typing.Union[Event, EventBlock])
@beam.typehints.with_output_types(Record)
class FeaturesByKeyBlock(beam.PTransform):
  """Events (timestamped `Event`s, or `EventBlock`s when `event_blocks`) -> the
  features records of `WindowedFeatures`, batch only.

  See the module docstring; `WindowedFeatures` selects it automatically
  when `applies(spec, events)`.
  """

  def __init__(self, spec: WindowSpec, blocks: int = DEFAULT_BLOCKS, *, event_blocks: bool = False):
    super().__init__()
    if spec.kind not in ('fixed', 'sliding'):
      raise ValueError(f'the batch path computes fixed or sliding windows, not {spec.kind!r}')
    self._spec = spec
    self._blocks = blocks
    self._event_blocks = event_blocks

  def expand(self, events):
    split = _SplitBlocksFn(self._blocks) if self._event_blocks else _BlockEventsFn(self._blocks)
    return (
      events
      | 'BlockEvents' >> beam.ParDo(split)
      | 'GroupBlocks' >> beam.GroupByKey()
      | 'BlockFeatures' >> beam.ParDo(_BlockFeaturesFn(self._spec))
    )
