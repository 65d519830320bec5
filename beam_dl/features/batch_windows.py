"""Windowed features in batch, vectorised: one Beam element per key block.

`WindowedFeatures` in streaming shape costs a Beam element, a window
assignment, a GroupByKey entry and a Python `WindowStats.add` per event
(~19k events/s per core). In batch nothing is late and every window fires
once, at the end of input, so the same records can be computed by:

  1. `_BlockEventsFn`: per bundle, events are appended to plain lists per
     key block (crc32(key) % blocks, stable across processes) with their
     element timestamps in microseconds; finish_bundle emits one
     (block, EventBlock) per non-empty block;
  2. a GroupByKey on the block number (a few elements per bundle cross it,
     not one per event);
  3. `block_features`: numpy over the block's events: window starts from the
     timestamps (Beam's fixed/sliding assignment in integer microseconds),
     one lexsort by (key, window, time, values), `ufunc.reduceat` per group,
     then one `features_record` per key and window.

Outputs are the streaming path's records (same keys, windows, pane fields
and features; floating-point sums may differ in the last bits: numpy sums
pairwise, the streaming combiner by Welford/Chan updates). Only fixed and
sliding windows without early triggers take this path (`applies`); sessions
merge windows and early panes depend on processing time, so they stay on the
streaming path.
"""
from __future__ import annotations

import zlib
from typing import Iterable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms import window as bw
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming, WindowedValue

from beam_dl.element_types import Record
from beam_dl.features.aggregates import features_record
from beam_dl.features.windows import WindowSpec
from beam_dl.io.events import Event

DEFAULT_BLOCKS = 64
# A batch GroupByKey fires each window once, when the input ends: the pane
# the streaming path's records carry in batch.
BATCH_PANE = ('ON_TIME', 0)
_ON_TIME = PaneInfo(is_first=True, is_last=True, timing=PaneInfoTiming.ON_TIME, index=0, nonspeculative_index=0)


class EventBlock(NamedTuple):
  """Events of some keys: keys [N] (list), times [N] int64 micros, values [N, F] float64."""

  keys: list
  micros: np.ndarray
  values: np.ndarray


def applies(spec: WindowSpec, pcoll: beam.PCollection) -> bool:
  """True when `pcoll` is bounded in a batch pipeline and `spec` is fixed or
  sliding without early firings: then every window fires exactly once."""
  options = pcoll.pipeline._options  # pylint: disable=protected-access
  streaming = options is not None and options.view_as(StandardOptions).streaming
  return (not streaming and pcoll.is_bounded and spec.kind in ('fixed', 'sliding')
          and spec.early_after_secs is None and spec.early_after_count is None)


def block_of(key, blocks: int) -> int:
  """A key's block number, the same in every process (unlike hash())."""
  return zlib.crc32(str(key).encode('utf-8')) % blocks


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


def block_features(block: EventBlock, spec: WindowSpec) -> list[tuple[bw.IntervalWindow, dict]]:
  """(window, features record) for every key and window of the block's events."""
  if not len(block.micros):
    return []
  names, codes = np.unique(np.asarray(block.keys, dtype=object), return_inverse=True)
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
  lo, hi = np.minimum.reduceat(values, first, axis=0), np.maximum.reduceat(values, first, axis=0)
  last = first + count - 1
  times = micros / 1e6
  pane, pane_index = BATCH_PANE
  records = []
  for g, row in enumerate(first):
    n = int(count[g])
    features = {
        'count': n,
        'sum': (mean[g] * n).tolist(),
        'mean': mean[g].tolist(),
        'std': np.sqrt(np.maximum(m2[g], 0.0) / n).tolist(),
        'min': lo[g].tolist(),
        'max': hi[g].tolist(),
        'last': values[last[g]].tolist(),
        'first_time': float(times[row]),
        'last_time': float(times[last[g]]),
    }
    start = int(starts[row])
    window = bw.IntervalWindow(Timestamp(micros=start), Timestamp(micros=start + size))
    records.append((window, features_record(names[codes[row]], start / 1e6, (start + size) / 1e6, features,
                                            pane, pane_index)))
  return records


def merge_blocks(blocks: Iterable[EventBlock]) -> EventBlock:
  blocks = list(blocks)
  return EventBlock(
      [k for b in blocks for k in b.keys],
      np.concatenate([b.micros for b in blocks]),
      np.concatenate([b.values for b in blocks]),
  )


class _BlockEventsFn(beam.DoFn):
  """Event -> (block, EventBlock) per bundle and block: per-event work is a
  list append; arrays are built once per block in finish_bundle."""

  def __init__(self, blocks: int):
    self._blocks = blocks

  def start_bundle(self):
    self._pending = {}

  def process(self, event, timestamp=beam.DoFn.TimestampParam):
    block = self._pending.get(block_of(event.key, self._blocks))
    if block is None:
      block = self._pending[block_of(event.key, self._blocks)] = ([], [], [])
    block[0].append(event.key)
    block[1].append(timestamp.micros)
    block[2].append(event.values)

  def finish_bundle(self):
    for number, (keys, micros, values) in self._pending.items():
      block = EventBlock(keys, np.asarray(micros, np.int64), np.asarray(values, np.float64).reshape(len(keys), -1))
      yield bw.GlobalWindows.windowed_value((number, block))
    self._pending = {}


class _BlockFeaturesFn(beam.DoFn):
  """(block, [EventBlock]) -> features records, each in its window with the
  timestamp and ON_TIME pane a batch GroupByKey gives the streaming path's."""

  def __init__(self, spec: WindowSpec):
    self._spec = spec

  def process(self, element):
    _, blocks = element
    for window, record in block_features(merge_blocks(blocks), self._spec):
      yield WindowedValue(record, window.max_timestamp(), [window], _ON_TIME)


@beam.typehints.with_input_types(Event)
@beam.typehints.with_output_types(Record)
class FeaturesByKeyBlock(beam.PTransform):
  """Event (timestamped) -> the features records of `WindowedFeatures`, batch only.

  See the module docstring; `WindowedFeatures` selects it automatically
  when `applies(spec, events)`.
  """

  def __init__(self, spec: WindowSpec, blocks: int = DEFAULT_BLOCKS):
    super().__init__()
    if spec.kind not in ('fixed', 'sliding'):
      raise ValueError(f'the batch path computes fixed or sliding windows, not {spec.kind!r}')
    self._spec = spec
    self._blocks = blocks

  def expand(self, events):
    return (
        events
        | 'BlockEvents' >> beam.ParDo(_BlockEventsFn(self._blocks))
        | 'GroupBlocks' >> beam.GroupByKey()
        | 'BlockFeatures' >> beam.ParDo(_BlockFeaturesFn(self._spec))
    )
