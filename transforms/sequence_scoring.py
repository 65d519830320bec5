"""Scoring windowed event sequences with a model: the steps around RunInference.

    examples = sequences.records | ParDo(ToModelInputFn(forecast=True)).with_outputs('failed', main='examples')
    inferred = examples.examples | RunInferenceWithDeadLetters(JaxModelHandler(model_dir))
    scores = inferred.predictions | ParDo(FormatScoreFn(target_scale, target_offset))
    failed = inferred.failed | Map(restore_key)
    late = windowed.late | ParDo(LateDeadLetterFn(time.time))

A sequence record (`transforms.windowing.WindowedSequences`) becomes
(context JSON, float32 [T, F]): the context (key, window, pane, forecast
target, and the clock stamps of the newest event's way through the steps)
travels as the RunInference key, so nothing is joined back afterwards.
`pipelines.score_sequences` wires these; metrics are in the
'beam_dl.score_sequences' namespace (`latency_summary` reads them).

Where the time goes, per score, as Beam distributions (ms):

    latency_ms           arrival -> score formatted (the whole in-pipeline path)
    hop_source_ms        event time -> arrival (a live source: producer, broker, reader, parse)
    hop_window_ms        arrival -> pane emitted   (late-data gate, window, trigger)
    hop_handoff_ms       pane emitted -> model input made (between the stages)
    hop_model_ms         model input -> score formatted (batching, the model call)

`arrival` is stamped when the parsed event enters the windowing step, so
reading and parsing come before it; the Kafka writer adds its own
`beam_dl.io.kafka` distribution `write_ack_ms` (produce -> broker acknowledgement).
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
from typing import Any, Callable

import apache_beam as beam
import numpy as np
from apache_beam.utils.timestamp import Timestamp

from beam_dl.core.deadletter import dead_letter

NAMESPACE = 'beam_dl.score_sequences'
_log = logging.getLogger('beam_dl.score_sequences')  # under beam_dl: the CLI shows its INFO lines


def min_scoring_length(forecast: bool, min_length: int | None = None) -> int:
  """Fewest events a window needs to be scored: 1, 2 with a forecast (one to predict), or more."""
  return max(min_length or 1, 2 if forecast else 1)


# What a context carries beside the record, popped before the score record is written: the clock stamps
# and the pane's element timestamp (us; the score gets it back: RunInference in the global window
# emits its batches at the end of time).
STAMPS = ('arrival', 'emitted', 'to_model', 'timestamp_us')


def model_input(
  record: dict[str, Any], forecast: bool, now: float | None = None, timestamp_us: int | None = None
) -> tuple[str, np.ndarray]:
  """Sequence record -> (context JSON, float32 [T, F] steps the model sees).

  With `forecast` the last step is the target (kept in the context) and the
  model sees the steps before it. `now` stamps when the input was made;
  `timestamp_us` is the record's element timestamp.
  """
  seq = record['sequence']
  steps = seq.valid()
  context = {k: record[k] for k in ('key', 'window_start', 'window_end', 'pane', 'pane_index', 'length')}
  context['last_time'] = float(seq.times[len(steps) - 1])
  context['arrival'] = seq.arrival
  context['emitted'] = record.get('emitted')
  context['to_model'] = now
  context['timestamp_us'] = timestamp_us
  if forecast:
    context['target'] = steps[-1].tolist()
    steps = steps[:-1]
  return json.dumps(context), np.ascontiguousarray(steps, np.float32)


def score_record(
  context_json: str, inference, target_scale: float = 1.0, target_offset: float = 0.0
) -> tuple[dict[str, Any], dict[str, float | None]]:
  """(context JSON, model output) -> (score record without latency, its clock stamps `STAMPS`).

  `outputs` is the raw output vector; with a forecast target, `prediction`
  maps it back to data units (`* target_scale + target_offset`) and `score`
  is the mean absolute error against the target.
  """
  record = json.loads(context_json)
  stamps = {name: record.pop(name, None) for name in STAMPS}
  outputs = np.asarray(inference, np.float64).reshape(-1)
  record['outputs'] = outputs.tolist()
  if 'target' in record:
    prediction = outputs * target_scale + target_offset
    target = np.asarray(record['target'], np.float64)
    record['prediction'] = prediction.tolist()
    record['score'] = float(np.mean(np.abs(target - prediction[: len(target)])))
  return record, stamps


def restore_key(failure: dict):
  """Inference dead letters carry the context JSON as key; keep the user key (and the pane's timestamp)."""
  try:
    context = json.loads(failure['key'])
    letter = {
      **failure,
      'key': context['key'],
      'window_start': context['window_start'],
      'window_end': context['window_end'],
    }
  except (TypeError, ValueError, KeyError):
    return failure
  return _at_pane_time(letter, context.get('timestamp_us'))


def _at_pane_time(element, timestamp_us: int | None):
  """`element` at its pane's element timestamp again, when known (it is before the model step)."""
  return element if timestamp_us is None else beam.window.TimestampedValue(element, Timestamp(micros=timestamp_us))


class ToModelInputFn(beam.DoFn):
  """Sequence record -> (context JSON, float32 [T, F]); short windows to 'failed'.

  A pane with no event at all is dropped and counted (`empty_panes`): it
  carries no input to score or account for. With an allowed lateness, the
  FlinkRunner closes each window with one such pane when the lateness has
  passed.
  """

  def __init__(self, forecast: bool, min_length: int | None = None, clock: Callable[[], float] = time.time):
    self._forecast = forecast
    self._min_length = min_scoring_length(forecast, min_length)
    self._clock = clock
    self._short = beam.metrics.Metrics.counter(NAMESPACE, 'windows_too_short')
    self._empty = beam.metrics.Metrics.counter(NAMESPACE, 'empty_panes')

  def process(self, record, timestamp=beam.DoFn.TimestampParam):
    length = len(record['sequence'].valid())
    if length == 0:
      self._empty.inc()
      return
    if length < self._min_length:
      self._short.inc()
      yield beam.pvalue.TaggedOutput(
        'failed',
        dead_letter(
          record['key'],
          'sequence',
          f'window [{record["window_start"]:g}, {record["window_end"]:g}) has {length} event(s); '
          f'scoring needs at least {self._min_length} (--min_length)',
          window_start=record['window_start'],
          window_end=record['window_end'],
        ),
      )
      return
    yield model_input(record, self._forecast, self._clock(), timestamp.micros)


# (distribution, from stamp, to stamp): the hops of a score's newest event. 'event' is its own time
# (`last_time`): only from a live source (`FormatScoreFn(live_source=True)`), whose events are stamped
# as they happen, does event -> arrival measure the source hop (producer, broker, reader, parse).
HOPS = (
  ('hop_source_ms', 'event', 'arrival'),
  ('hop_window_ms', 'arrival', 'emitted'),
  ('hop_handoff_ms', 'emitted', 'to_model'),
  ('hop_model_ms', 'to_model', 'formatted'),
)


class FormatScoreFn(beam.DoFn):
  """(context JSON, PredictionResult) -> score record with `latency_s`.

  Latency is `clock()` minus the newest event's arrival; the distribution
  goes to Beam metrics, and p50/p99 over this worker's last `window`
  outputs to gauges (at a bundle's end, at most every `gauge_every_secs`:
  a percentile of 10,000 values per 10 ms bundle cost ~8% of a core) and
  the log: after the first bundle, then every `log_every_secs`, and once
  more when the worker ends if outputs came since (so a short batch run
  logs them too). `live_source`: the events' own times are when they
  happened (Kafka, Pub/Sub), so event -> arrival is the source hop
  (`hop_source_ms`); not for replayed history.
  """

  def __init__(
    self,
    target_scale: float = 1.0,
    target_offset: float = 0.0,
    clock: Callable[[], float] = time.time,
    window: int = 10_000,
    log_every_secs: float = 10.0,
    gauge_every_secs: float = 1.0,
    live_source: bool = False,
  ):
    self._scale, self._offset = target_scale, target_offset
    self._live_source = live_source
    self._clock = clock
    self._window = window
    self._log_every = log_every_secs
    self._gauge_every = gauge_every_secs
    self._dist = beam.metrics.Metrics.distribution(NAMESPACE, 'latency_ms')
    self._p50 = beam.metrics.Metrics.gauge(NAMESPACE, 'latency_p50_ms')
    self._p99 = beam.metrics.Metrics.gauge(NAMESPACE, 'latency_p99_ms')
    self._scored = beam.metrics.Metrics.counter(NAMESPACE, 'scored')
    self._hops = {name: beam.metrics.Metrics.distribution(NAMESPACE, name) for name, *_ in HOPS}

  def setup(self):
    self._latencies: collections.deque[float] = collections.deque(maxlen=self._window)
    self._recent_hops = {name: collections.deque(maxlen=self._window) for name, *_ in HOPS}
    self._last_log = self._last_gauge = float('-inf')
    self._unlogged = 0

  def process(self, element):
    context_json, result = element
    record, stamps = score_record(context_json, result.inference, self._scale, self._offset)
    now = self._clock()
    arrival = stamps['arrival']
    latency = now - arrival if arrival is not None else float('nan')
    record['latency_s'] = latency
    self._scored.inc()
    stamps['formatted'] = now
    stamps['event'] = record['last_time'] if self._live_source else None
    for name, start, end in HOPS:
      if stamps[start] is not None and stamps[end] is not None:
        hop = stamps[end] - stamps[start]
        self._hops[name].update(int(hop * 1000))
        self._recent_hops[name].append(hop)
    if arrival is not None:
      self._dist.update(int(latency * 1000))
      self._latencies.append(latency)
      self._unlogged += 1
    yield _at_pane_time(record, stamps['timestamp_us'])

  def finish_bundle(self):
    now = self._clock()
    if not self._latencies or now - self._last_gauge < self._gauge_every:
      return
    self._last_gauge = now
    p50, p99 = np.percentile(self._latencies, [50, 99])
    self._p50.set(int(p50 * 1000))
    self._p99.set(int(p99 * 1000))
    if now - self._last_log >= self._log_every:
      self._last_log = now
      self._log_latency(p50, p99)

  def teardown(self):
    if getattr(self, '_unlogged', 0):
      self._log_latency(*np.percentile(self._latencies, [50, 99]))

  def _log_latency(self, p50: float, p99: float) -> None:
    self._unlogged = 0
    hops = ', '.join(
      f'{name.removeprefix("hop_").removesuffix("_ms")} %.1f/%.1f' % tuple(np.percentile(values, [50, 99]) * 1000)
      for name, values in self._recent_hops.items()
      if values
    )
    _log.info(
      'score_sequences latency over last %d outputs: p50 %.1f ms, p99 %.1f ms (p50/p99 ms per hop: %s)',
      len(self._latencies),
      p50 * 1000,
      p99 * 1000,
      hops or 'none',
    )


class LateDeadLetterFn(beam.DoFn):
  """Late event -> dead letter, re-stamped with the processing time.

  A late event's own timestamp is behind the watermark by definition; a
  windowed writer downstream would drop it as late again.
  """

  def __init__(self, clock: Callable[[], float]):
    self._clock = clock

  def process(self, late: dict):
    yield beam.window.TimestampedValue(
      dead_letter(
        late['key'],
        'late',
        late['reason'],
        event_time=late['event_time'],
        window_start=late['window_start'],
        window_end=late['window_end'],
      ),
      self._clock(),
    )


def latency_summary(result) -> dict:
  """{metric name: value} for the scoring steps' latency and count metrics of a finished run."""
  # Beam 2.77's FnApiRunner merges per-bundle metrics recursively (one frame
  # per bundle): a long streaming run of many small bundles needs more stack.
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(limit, 100_000))
  try:
    metrics = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
  finally:
    sys.setrecursionlimit(limit)
  summary = {}
  for counter in metrics['counters']:
    summary[counter.key.metric.name] = counter.committed
  for gauge in metrics['gauges']:
    summary[gauge.key.metric.name] = gauge.committed.value if gauge.committed else None
  for dist in metrics['distributions']:
    if dist.committed and dist.committed.count:
      name = dist.key.metric.name.removesuffix('_ms')
      summary[f'{name}_mean_ms'] = dist.committed.mean
      summary[f'{name}_max_ms'] = dist.committed.max
  return summary
