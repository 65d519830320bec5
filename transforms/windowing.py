"""Per-key event-time windows and the features computed in them.

The same transforms run in batch and in streaming:

  EventTimestamps(from_source=False)   Event -> Event stamped with its event
                                       time (batch: from the data's `time`);
                                       from_source=True keeps the source's
                                       timestamps (Pub/Sub, Kafka, files).
  WindowedFeatures(spec)               Event -> one features record per key,
                                       window and pane (count, sum, mean,
                                       std, min, max, last, rate)
  WindowedSequences(spec, n)           Event -> the last n events per key and
                                       window as a padded [n, F] sequence + mask
  WindowedSpectrograms(spec, stft)     Event -> STFT spectrogram per key and
                                       window of a fixed-rate signal

Each returns `WindowedOutputs(records, late)`: `late` holds the events that
arrived after their window closed (see `beam_dl.features.late`), rather than
letting GroupByKey drop them. Record schemas are in docs/streaming.md.
Windows use the element timestamps: apply `EventTimestamps` first.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Union

import apache_beam as beam
from apache_beam.utils.windowed_value import PaneInfoTiming

from beam_dl.core.element_types import Record
from beam_dl.features import batch_windows
from beam_dl.features.aggregates import WindowStatsFn, features_record
from beam_dl.features.lastn import LastNFn
from beam_dl.features.late import LATE, LateDataGate
from beam_dl.features.spectrogram import SpectrogramSpec, place_samples, spectrogram
from beam_dl.features.windows import WindowSpec
from beam_dl.formats.events import Event

Keyed = beam.typehints.Tuple[str, beam.typehints.Any]


class WindowedOutputs(NamedTuple):
  records: beam.PCollection
  late: beam.PCollection


def _seconds(timestamp) -> float:
  return timestamp.micros / 1e6


def window_fields(window, pane_info) -> dict:
  """key-independent record fields: window bounds (seconds) and pane."""
  return {
    'window_start': _seconds(window.start),
    'window_end': _seconds(window.end),
    'pane': PaneInfoTiming.to_string(pane_info.timing),
    'pane_index': pane_info.index,
  }


class _KeyEventFn(beam.DoFn):
  """Event -> (key, (timestamp s, values, arrival s, event time s)); arrival from `clock`."""

  def __init__(self, clock: Callable[[], float]):
    self._clock = clock

  def process(self, event: Event, timestamp=beam.DoFn.TimestampParam):
    yield event.key, (_seconds(timestamp), tuple(event.values), self._clock(), event.time)


@beam.typehints.with_input_types(Event)
@beam.typehints.with_output_types(Event)
class EventTimestamps(beam.PTransform):
  """Stamps each Event with its event time, or keeps the source's timestamps.

  Batch sources carry no timestamps, so they come from the data
  (`Event.time`, seconds since the epoch). Streaming sources (Pub/Sub with
  a timestamp attribute or publish time, Kafka, files) set timestamps that
  the watermark follows, so `from_source=True` keeps them.
  """

  def __init__(self, from_source: bool = False):
    super().__init__()
    self._from_source = from_source

  def expand(self, events):
    if self._from_source:
      return events
    return events | 'StampEventTime' >> beam.Map(lambda e: beam.window.TimestampedValue(e, e.time)).with_output_types(
      Event
    )


class _KeyGateAndWindow(beam.PTransform):
  """Event -> windowed (key, (t, values, arrival)), plus the late events."""

  def __init__(self, spec: WindowSpec, route_late: bool, clock: Callable[[], float]):
    super().__init__()
    self._spec = spec
    self._route_late = route_late
    self._clock = clock

  def expand(self, events):
    keyed = events | 'KeyEvents' >> beam.ParDo(_KeyEventFn(self._clock)).with_output_types(Keyed)
    if self._route_late:
      gated = keyed | 'RouteLateData' >> beam.ParDo(LateDataGate(self._spec)).with_output_types(
        Keyed, **{LATE: Record}
      ).with_outputs(LATE, main='on_time')
      keyed, late = gated.on_time, gated[LATE]
    else:
      late = keyed.pipeline | 'NoLateData' >> beam.Create([]).with_output_types(Record)
    windowed = keyed | 'Window' >> self._spec.as_run_on(events).window_into()
    return windowed, late


class _FeaturesRecordFn(beam.DoFn):
  def process(self, element, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
    key, features = element
    fields = window_fields(window, pane)
    yield features_record(
      key, fields['window_start'], fields['window_end'], features, fields['pane'], fields['pane_index']
    )


@beam.typehints.with_input_types(Union[Event, batch_windows.EventBlock])
class WindowedFeatures(beam.PTransform):
  """Event -> features record per key, window and pane, plus late events.

  Args:
    spec: the windowing (kind, size, lateness, early triggers).
    route_late: send late events to `.late` (a stateful gate per key); off
      for batch, where nothing is late, to save its cost.
    clock: arrival-time source (seconds), injectable for tests.
    batch_path: compute per key block with numpy
      (`beam_dl.features.batch_windows`; no late gate: nothing is late in
      batch); None picks it when `batch_windows.applies`.
    event_blocks: the input elements are `batch_windows.EventBlock`s (columnar
      events with their own event times, from a source that reads many
      events at once; no `EventTimestamps` needed). The batch path then has
      no per-event Beam element at all (11-20x the streaming path in
      benchmarks/RESULTS.md; `ReadEventBlocks` reads files so); where
      it does not apply, blocks are unpacked into timestamped `Event`s.
  """

  def __init__(
    self,
    spec: WindowSpec,
    *,
    route_late: bool = True,
    clock: Callable[[], float] = time.time,
    batch_path: bool | None = None,
    event_blocks: bool = False,
  ):
    super().__init__()
    self._spec = spec
    self._route_late = route_late
    self._clock = clock
    self._batch_path = batch_path
    self._event_blocks = event_blocks

  def expand(self, events) -> WindowedOutputs:
    if self._batch_path or (self._batch_path is None and batch_windows.applies(self._spec, events)):
      records = events | 'FeaturesByKeyBlock' >> batch_windows.FeaturesByKeyBlock(
        self._spec.as_run_on(events), event_blocks=self._event_blocks
      )
      return WindowedOutputs(records, events.pipeline | 'NoLateData' >> beam.Create([]).with_output_types(Record))
    if self._event_blocks:
      events = events | 'Unblock' >> beam.FlatMap(batch_windows.unblock)
    windowed, late = events | 'KeyAndWindow' >> _KeyGateAndWindow(self._spec, self._route_late, self._clock)
    records = (
      windowed
      | 'Aggregate' >> beam.CombinePerKey(WindowStatsFn())
      | 'ToRecords' >> beam.ParDo(_FeaturesRecordFn()).with_output_types(Record)
    )
    return WindowedOutputs(records, late)


class _SequenceRecordFn(beam.DoFn):
  """(key, Sequence) -> record, stamped `emitted` (clock) when the pane leaves the combine."""

  def __init__(self, clock: Callable[[], float]):
    self._clock = clock

  def process(self, element, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
    key, sequence = element
    yield {
      'key': key,
      **window_fields(window, pane),
      'length': sequence.length,
      'sequence': sequence,
      'emitted': self._clock(),
    }


@beam.typehints.with_input_types(Event)
class WindowedSequences(beam.PTransform):
  """Event -> the last `n` events per key, window and pane, plus late events.

  Records: {"key", "window_start", "window_end", "pane", "pane_index",
  "length", "sequence", "emitted"} with `sequence` a `beam_dl.features.Sequence`
  (values float32 [n, F], mask bool [n], times [n], arrival) and `emitted`
  the clock when the pane left the windowing step (arrival -> emitted is the
  time an event spent in the late-data gate, the window and its trigger).
  """

  def __init__(
    self,
    spec: WindowSpec,
    n: int,
    *,
    num_features: int | None = None,
    route_late: bool = True,
    clock: Callable[[], float] = time.time,
  ):
    super().__init__()
    self._spec = spec
    self._combine = LastNFn(n, num_features)
    self._route_late = route_late
    self._clock = clock

  def expand(self, events) -> WindowedOutputs:
    windowed, late = events | 'KeyAndWindow' >> _KeyGateAndWindow(self._spec, self._route_late, self._clock)
    records = (
      windowed
      | 'LastN' >> beam.CombinePerKey(self._combine)
      | 'ToRecords' >> beam.ParDo(_SequenceRecordFn(self._clock)).with_output_types(Record)
    )
    return WindowedOutputs(records, late)


class _SpectrogramRecordFn(beam.DoFn):
  def __init__(self, stft: SpectrogramSpec, feature: int):
    self._stft = stft
    self._feature = feature

  def process(self, element, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
    key, events = element
    fields = window_fields(window, pane)
    samples = ((t, values[self._feature]) for t, values, *_ in events)
    signal, missing = place_samples(samples, fields['window_start'], fields['window_end'], self._stft.sample_rate)
    freqs, frames, image = spectrogram(signal, self._stft)
    yield {
      'key': key,
      **fields,
      'missing_samples': missing,
      'frequencies': freqs,
      'frame_times': frames + fields['window_start'],
      'spectrogram': image,
    }


@beam.typehints.with_input_types(Event)
class WindowedSpectrograms(beam.PTransform):
  """Event -> STFT spectrogram of feature `feature` per key and fixed/sliding window.

  Samples are placed on the `stft.sample_rate` grid of the window (missing
  samples are zeros, counted in `missing_samples`); `spectrogram` is float32
  [frequencies, frames], ready to be an image for a CNN.
  """

  def __init__(
    self,
    spec: WindowSpec,
    stft: SpectrogramSpec,
    *,
    feature: int = 0,
    route_late: bool = True,
    clock: Callable[[], float] = time.time,
  ):
    super().__init__()
    if spec.kind not in ('fixed', 'sliding'):
      raise ValueError('spectrograms need fixed or sliding windows (a fixed-length signal)')
    self._spec = spec
    self._stft = stft
    self._feature = feature
    self._route_late = route_late
    self._clock = clock

  def expand(self, events) -> WindowedOutputs:
    windowed, late = events | 'KeyAndWindow' >> _KeyGateAndWindow(self._spec, self._route_late, self._clock)
    records = (
      windowed
      | 'CollectSamples' >> beam.CombinePerKey(beam.combiners.ToListCombineFn())
      | 'Spectrogram' >> beam.ParDo(_SpectrogramRecordFn(self._stft, self._feature)).with_output_types(Record)
    )
    return WindowedOutputs(records, late)
