"""Score per-key event sequences with a Flax LSTM/GRU, in batch or streaming.

    # batch, over files of JSON-lines events
    python -m pipelines.score_sequences --input 'events/*.jsonl' \
        --model_dir model --output out/scores --event_value_fields co2 \
        --window sliding --window_size 7257600 --window_period 604800 --seq_len 12 --forecast

    # streaming, locally: score files as they land in a directory, for 60 s
    python -m pipelines.score_sequences --streaming --input 'incoming/*.jsonl' \
        --stop_after_secs 60 --model_dir model --output out/scores ...

    # streaming on Dataflow from Pub/Sub
    python -m pipelines.score_sequences --streaming --input_subscription \
        projects/P/subscriptions/S --runner DataflowRunner ...

    # Kafka in, Kafka out (docs/streaming.md: a local broker, Prism, your Flink cluster)
    python -m pipelines.score_sequences --kafka_bootstrap 127.0.0.1:9092 --kafka_topic events \
        --kafka_output_topic scores --model_dir model --runner PrismRunner \
        --prism_location .runners/prism ...

Events are JSON objects, one a line: {"key": "sensor-1", "time": <seconds
since the epoch>, "<value field>": <number>, ...}. Per key and event-time
window, the last `--seq_len` events (oldest first) go to RunInference with
the model in `--model_dir` (a beam_dl 'rnn' directory, input (None, F)).
With `--forecast`, the model sees all but the last event and predicts it;
the score is the mean absolute error of that prediction (an anomaly score).

Outputs `<output>-*.jsonl`: {"key", "window_start", "window_end", "pane",
"pane_index", "length", "last_time", "outputs", ["prediction", "target",
"score",] "latency_s"}; `<output>-failed-*.jsonl`: dead letters (malformed
events, windows too short to score, failed inference) and late events
(stage "late"); with `--kafka_output_topic` the same records go to Kafka
topics instead of or beside the files. `latency_s` is output time minus the arrival time of the
newest event in the window; its p50/p99 are logged and exported as the
gauges `latency_p50_ms`/`latency_p99_ms` (plus the distribution
`latency_ms`) in the 'beam_dl.score_sequences' metrics namespace.

Timestamps: batch takes event times from the data (the "time" field);
streaming keeps the source's (file read time, Pub/Sub publish time or
`--timestamp_attribute`, Kafka record time), so windows follow the watermark.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Callable

import apache_beam as beam
import numpy as np
from apache_beam.coders import BooleanCoder, BytesCoder
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from beam_dl import checkpoints, cli
from beam_dl.deadletter import dead_letter
from beam_dl.element_types import TextLine
from beam_dl.features.windows import WindowSpec
from beam_dl.handler import JaxModelHandler
from beam_dl.io.kafka import ReadKafkaValues, WriteKafkaJson
from beam_dl.io.events import EventSpec
from beam_dl.metrics_export import run_pipeline
from beam_dl.options import DriftOptions, InferenceOptions, IOOptions, MetricsOptions, OptionsError, require, switch
from transforms.drift import drift_enabled, score_sequences_drift
from transforms.inference import RunInferenceWithDeadLetters
from transforms.io import WriteJsonLines
from transforms.metrics import CountDeadLetters
from transforms.sequences import ParseEvents
from transforms.windowing import EventTimestamps, WindowedSequences

NAMESPACE = 'beam_dl.score_sequences'
_log = logging.getLogger(__name__)


class ScoreSequencesOptions(PipelineOptions):
  """Event fields, windowing, sources and scoring for score_sequences."""

  @classmethod
  def _add_argparse_args(cls, parser):
    add = parser.add_argument
    add('--event_key_field', default='key', help='JSON field holding the key (default key).')
    add('--event_time_field', default='time', help='JSON field holding event time, seconds (default time).')
    add('--event_value_fields', default='value', help='Comma-separated numeric fields: the F features.')
    add('--window', choices=['fixed', 'sliding', 'session', 'global'], default='sliding',
        help='Event-time window kind (default sliding).')
    add('--window_size', type=float, default=600.0, help='Window length, seconds (fixed, sliding).')
    add('--window_period', type=float, default=60.0, help='Sliding window step, seconds.')
    add('--session_gap', type=float, default=300.0, help='Session gap, seconds.')
    add('--allowed_lateness', type=float, default=0.0, help='Late events within this many seconds update windows.')
    add('--early_after_secs', type=float, default=None, help='EARLY panes every N seconds of processing time.')
    add('--early_after_count', type=int, default=None,
        help='EARLY panes every N events (streaming default 1: a score per event).')
    add('--accumulation', choices=['accumulating', 'discarding'], default='accumulating',
        help='Whether later panes of a window include earlier events (default accumulating).')
    add('--seq_len', type=int, default=32, help='Events per sequence: the last N of the window.')
    add('--min_length', type=int, default=None,
        help='Windows with fewer events are dead letters, not scored (default 1; 2 with --forecast).')
    add('--forecast', type=switch, nargs='?', const=True, default=False,
        help='Model predicts the last event from the ones before; score = mean |error| '
             '(--forecast or --forecast=true|false).')
    add('--poll_interval_secs', type=float, default=1.0, help='Streaming from files: seconds between matches.')
    add('--stop_after_secs', type=float, default=None,
        help='Streaming from files: stop watching after this many seconds (bounded runs, tests).')
    add('--write_frequency_secs', type=float, default=5.0, help='Streaming: seconds between output file windows.')
    add('--input_topic', default=None, help='Pub/Sub topic to read events from (streaming).')
    add('--input_subscription', default=None, help='Pub/Sub subscription to read events from (streaming).')
    add('--timestamp_attribute', default=None, help='Pub/Sub attribute holding event timestamps.')
    add('--kafka_bootstrap_servers', '--kafka_bootstrap', dest='kafka_bootstrap_servers', default=None,
        help='Kafka bootstrap servers, host:port[,host:port] (streaming).')
    add('--kafka_topic', default=None, help='Kafka topic to read events from (record time = event time).')
    add('--kafka_output_topic', default=None,
        help='Kafka topic to write score records to (JSON, keyed by event key); dead letters go to '
             '--kafka_failed_topic. With it, --output is optional.')
    add('--kafka_failed_topic', default=None,
        help='Kafka topic for dead letters and late events (default <kafka_output_topic>-failed).')
    add('--kafka_reader', choices=['python', 'xlang'], default='python',
        help='python: beam_dl.io.kafka (confluent-kafka, runs on any runner that runs Python SDFs); '
             "xlang: Beam's cross-language KafkaIO (needs Java and its expansion service).")
    add('--kafka_stop_after_idle_secs', type=float, default=None,
        help='Kafka (python reader): end the read once a partition has had no record for this long '
             '(bounded runs: tests, benchmarks).')


def window_spec(opts: ScoreSequencesOptions, streaming: bool) -> WindowSpec:
  """The windowing from the flags; streaming defaults to a score per event."""
  early_count = opts.early_after_count
  if streaming and early_count is None and opts.early_after_secs is None:
    early_count = 1
  return WindowSpec(
      kind=opts.window, size=opts.window_size, period=opts.window_period if opts.window == 'sliding' else None,
      gap=opts.session_gap if opts.window == 'session' else None, allowed_lateness=opts.allowed_lateness,
      early_after_secs=opts.early_after_secs, early_after_count=early_count,
      accumulation=opts.accumulation)


# -- reading ------------------------------------------------------------------


def _lines_of(readable_file) -> list[bytes]:
  # Bytes: ParseEvents decodes each line, so bad UTF-8 is one dead letter, not a crash.
  return readable_file.read().splitlines()


class FirstSightingFn(beam.DoFn):
  """(path, metadata) -> metadata the first time a path is seen.

  `MatchContinuously(has_deduplication=True)` (Beam's Watch) ends at once on
  the local FnApiRunner in Beam 2.77, so the watched-directory mode polls
  without deduplication and keeps one bit of state per path here instead.
  """

  SEEN = ReadModifyWriteStateSpec('seen', BooleanCoder())

  def __init__(self):
    self._new_files = beam.metrics.Metrics.counter(NAMESPACE, 'files_matched')

  def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
    if not seen.read():
      seen.write(True)
      self._new_files.inc()
      yield element[1]


@beam.typehints.with_output_types(TextLine)
class ReadEventLines(beam.PTransform):
  """Text lines of events from files (batch or watched), Pub/Sub or Kafka.

  The watched-directory and Kafka reads end with a Reshuffle, a stage
  boundary, and that is the fix for issue 14. Beam 2.77's FnApiRunner (what the
  DirectRunner runs this pipeline on) takes the input watermark of the stage
  holding a splittable DoFn source (the file watch, the Kafka reader) from
  the Impulse before it, which is done at once: +inf. Without a boundary the FnApiRunner fuses the
  downstream stateful `LateDataGate` into that stage, so the gate's
  event-time timers fired right after the first file was read; the gate
  took every window of those keys as closed and sent each later event of
  them to `late`. After the boundary the gate's input watermark is the
  watch's output watermark, held while the watch still polls. Runners with
  per-element watermarks (Flink, Dataflow, Prism) were not affected; for
  them the Reshuffle is one extra shuffle of the raw lines.
  """

  def __init__(self, opts: ScoreSequencesOptions, io: IOOptions, streaming: bool,
               clock: Callable[[], float] = time.time):
    super().__init__()
    self._opts, self._io, self._streaming, self._clock = opts, io, streaming, clock

  def expand(self, pbegin):
    opts = self._opts
    if opts.input_topic or opts.input_subscription:
      return (pbegin
              | 'ReadFromPubSub' >> beam.io.ReadFromPubSub(
                  topic=opts.input_topic, subscription=opts.input_subscription,
                  timestamp_attribute=opts.timestamp_attribute)
              | 'DecodeMessages' >> beam.Map(lambda b: b.decode('utf-8', errors='replace')))
    if opts.kafka_bootstrap_servers or opts.kafka_topic:
      return pbegin | 'ReadFromKafka' >> _read_kafka(opts) | 'EndSourceStage' >> beam.Reshuffle()
    if not self._streaming:
      return pbegin | 'ReadText' >> beam.io.ReadFromText(self._io.input, coder=BytesCoder())
    stop = (Timestamp.of(self._clock() + opts.stop_after_secs) if opts.stop_after_secs
            else MAX_TIMESTAMP)
    return (pbegin
            | 'WatchFiles' >> fileio.MatchContinuously(
                self._io.input, interval=opts.poll_interval_secs, has_deduplication=False,
                start_timestamp=Timestamp.of(self._clock()), stop_timestamp=stop)
            | 'KeyByPath' >> beam.Map(lambda m: (m.path, m))
            | 'NewFilesOnly' >> beam.ParDo(FirstSightingFn())
            | 'ReadMatches' >> fileio.ReadMatches()
            | 'SplitLines' >> beam.FlatMap(_lines_of)
            | 'EndSourceStage' >> beam.Reshuffle())


def _read_kafka(opts: ScoreSequencesOptions) -> beam.PTransform:
  """Kafka record values as text, stamped with the record time (the producer's event time)."""
  if opts.kafka_reader == 'xlang':
    from apache_beam.io.kafka import ReadFromKafka  # cross-language: needs Java and the expansion service
    return (ReadFromKafka(consumer_config={'bootstrap.servers': opts.kafka_bootstrap_servers},
                          topics=[opts.kafka_topic], timestamp_policy=ReadFromKafka.create_time_policy)
            | 'KafkaValues' >> beam.Map(lambda kv: kv[1].decode('utf-8', errors='replace')))
  return (ReadKafkaValues(opts.kafka_bootstrap_servers, opts.kafka_topic,
                          stop_after_idle_s=opts.kafka_stop_after_idle_secs)
          | 'DecodeValues' >> beam.Map(lambda b: b.decode('utf-8', errors='replace')))


# -- sequences -> model inputs -------------------------------------------------


class _ToExampleFn(beam.DoFn):
  """Sequence record -> (context JSON, float32 [T, F]); short windows are dead letters.

  The context (key, window, pane, arrival, forecast target) travels as the
  RunInference key, a JSON string, so nothing is joined back afterwards.
  """

  def __init__(self, forecast: bool, min_length: int | None = None):
    self._forecast = forecast
    self._min_length = max(min_length or 1, 2 if forecast else 1)
    self._short = beam.metrics.Metrics.counter(NAMESPACE, 'windows_too_short')

  def process(self, record):
    seq = record['sequence']
    steps = seq.valid()
    if len(steps) < self._min_length:
      self._short.inc()
      yield beam.pvalue.TaggedOutput('failed', dead_letter(
          record['key'], 'sequence',
          f'window [{record["window_start"]:g}, {record["window_end"]:g}) has {len(steps)} event(s); '
          f'scoring needs at least {self._min_length} (--min_length)',
          window_start=record['window_start'], window_end=record['window_end']))
      return
    context = {k: record[k] for k in ('key', 'window_start', 'window_end', 'pane', 'pane_index', 'length')}
    context['last_time'] = float(seq.times[len(steps) - 1])
    context['arrival'] = seq.arrival
    if self._forecast:
      context['target'] = steps[-1].tolist()
      steps = steps[:-1]
    yield json.dumps(context), np.ascontiguousarray(steps, np.float32)


class FormatScoreFn(beam.DoFn):
  """(context JSON, PredictionResult) -> score record with latency.

  Latency is `clock()` minus the newest event's arrival; the distribution
  goes to Beam metrics, and p50/p99 over this worker's last `window`
  outputs to gauges and the log (every `log_every_secs`).
  """

  def __init__(self, target_scale: float = 1.0, target_offset: float = 0.0,
               clock: Callable[[], float] = time.time, window: int = 10_000, log_every_secs: float = 10.0):
    self._scale, self._offset = target_scale, target_offset
    self._clock = clock
    self._window = window
    self._log_every = log_every_secs
    self._dist = beam.metrics.Metrics.distribution(NAMESPACE, 'latency_ms')
    self._p50 = beam.metrics.Metrics.gauge(NAMESPACE, 'latency_p50_ms')
    self._p99 = beam.metrics.Metrics.gauge(NAMESPACE, 'latency_p99_ms')
    self._scored = beam.metrics.Metrics.counter(NAMESPACE, 'scored')

  def setup(self):
    self._latencies: list[float] = []
    self._last_log = self._clock()

  def process(self, element):
    context_json, result = element
    record = json.loads(context_json)
    arrival = record.pop('arrival')
    outputs = np.asarray(result.inference, np.float64).reshape(-1)
    record['outputs'] = outputs.tolist()
    if 'target' in record:
      prediction = outputs * self._scale + self._offset
      target = np.asarray(record['target'], np.float64)
      record['prediction'] = prediction.tolist()
      record['score'] = float(np.mean(np.abs(target - prediction[: len(target)])))
    latency = self._clock() - arrival if arrival is not None else float('nan')
    record['latency_s'] = latency
    self._scored.inc()
    if arrival is not None:
      self._dist.update(int(latency * 1000))
      self._latencies.append(latency)
      del self._latencies[: -self._window]
    yield record

  def finish_bundle(self):
    if not self._latencies:
      return
    p50, p99 = np.percentile(self._latencies, [50, 99])
    self._p50.set(int(p50 * 1000))
    self._p99.set(int(p99 * 1000))
    now = self._clock()
    if now - self._last_log >= self._log_every:
      self._last_log = now
      _log.info('score_sequences latency over last %d outputs: p50 %.1f ms, p99 %.1f ms',
                len(self._latencies), p50 * 1000, p99 * 1000)


def _restore_key(failure: dict) -> dict:
  """Inference dead letters carry the context JSON as key; keep the user key."""
  try:
    context = json.loads(failure['key'])
    return {**failure, 'key': context['key'], 'window_start': context['window_start'],
            'window_end': context['window_end']}
  except (TypeError, ValueError, KeyError):
    return failure


class _LateDeadLetterFn(beam.DoFn):
  """Late event -> dead letter, re-stamped with the processing time.

  A late event's own timestamp is behind the watermark by definition; the
  windowed file writer downstream would drop it as late again.
  """

  def __init__(self, clock: Callable[[], float]):
    self._clock = clock

  def process(self, late: dict):
    yield beam.window.TimestampedValue(dead_letter(
        late['key'], 'late', late['reason'], event_time=late['event_time'],
        window_start=late['window_start'], window_end=late['window_end']), self._clock())


# -- the pipeline ----------------------------------------------------------------


class _WriteStreamingJsonLines(beam.PTransform):
  """JSON lines for unbounded input: files per `frequency`-second window and pane.

  `fileio.WriteToFiles` names files by window *and pane*
  (`<prefix>-<start>-<end>-<pane>-<shard>-of-<n>.jsonl`), so two firings of
  one window never overwrite each other.
  """

  def __init__(self, prefix: str, frequency: float):
    super().__init__()
    self._prefix, self._frequency = prefix, frequency

  def expand(self, records):
    directory, name = os.path.split(self._prefix)
    return (records
            | 'WriteWindows' >> beam.WindowInto(beam.window.FixedWindows(self._frequency))
            | 'ToJson' >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
            | 'WriteFiles' >> fileio.WriteToFiles(
                directory or '.', file_naming=fileio.default_file_naming(name, '.jsonl'), shards=1))


def build(pipeline: beam.Pipeline, options: PipelineOptions, clock: Callable[[], float] = time.time):
  """Adds the scoring steps to `pipeline`; returns (scores, failed)."""
  opts, io = options.view_as(ScoreSequencesOptions), options.view_as(IOOptions)
  inference = options.view_as(InferenceOptions)
  streaming = options.view_as(StandardOptions).streaming
  external = opts.input_topic or opts.input_subscription or opts.kafka_topic
  require(options, 'model_dir', *(() if opts.kafka_output_topic else ('output',)),
          *(() if external else ('input',)))
  if opts.kafka_topic or opts.kafka_output_topic:
    require(options, 'kafka_bootstrap_servers')
  if external and not streaming:
    # Pub/Sub and Kafka are unbounded: they imply streaming. Turned on here
    # because a Flex Template can't pass Beam's store_true --streaming.
    options.view_as(StandardOptions).streaming = streaming = True
    logging.getLogger(__name__).info('streaming mode turned on for the unbounded source')
  if not streaming and not external:
    cli.require_matches(io.input)
  spec = checkpoints.load_spec(inference.model_dir)
  fields = tuple(f.strip() for f in opts.event_value_fields.split(',') if f.strip())
  if not spec.is_sequence or tuple(spec.input_shape[1:]) != (len(fields),):
    raise OptionsError(f'{inference.model_dir}: model input {spec.input_shape} does not take sequences '
                       f'of the {len(fields)} --event_value_fields {fields}')
  event_spec = EventSpec(value_fields=fields, key_field=opts.event_key_field, time_field=opts.event_time_field)

  lines = pipeline | 'ReadEvents' >> ReadEventLines(opts, io, streaming, clock)
  parsed = lines | 'ParseEvents' >> ParseEvents(event_spec, with_timestamps=not streaming)
  events = parsed.events | 'Timestamps' >> EventTimestamps(from_source=True)
  sequences = events | 'Sequences' >> WindowedSequences(
      window_spec(opts, streaming), opts.seq_len, num_features=len(fields), route_late=streaming, clock=clock)
  examples = sequences.records | 'ToExamples' >> beam.ParDo(_ToExampleFn(opts.forecast, opts.min_length)).with_outputs(
      'failed', main='examples')
  handler = JaxModelHandler(inference.model_dir, **inference.handler_kwargs())
  inferred = examples.examples | 'Score' >> RunInferenceWithDeadLetters(handler)
  extra = spec.extra or {}
  scores = inferred.predictions | 'FormatScores' >> beam.ParDo(FormatScoreFn(
      float(extra.get('target_scale', 1.0)), float(extra.get('target_offset', 0.0)), clock=clock))
  failures = {
      'Parse': parsed.failed,
      'Sequence': examples.failed,
      'Inference': inferred.failed | 'RestoreKeys' >> beam.Map(_restore_key),
      'Late': sequences.late | 'LateToDeadLetters' >> beam.ParDo(_LateDeadLetterFn(clock)),
  }
  failed = ([pcoll | f'Global{name}Failures' >> beam.WindowInto(beam.window.GlobalWindows())
             for name, pcoll in failures.items()]
            | 'AllFailures' >> beam.Flatten())
  if opts.kafka_output_topic:
    scores | 'ScoresToKafka' >> WriteKafkaJson(opts.kafka_bootstrap_servers, opts.kafka_output_topic)
    failed | 'FailuresToKafka' >> WriteKafkaJson(
        opts.kafka_bootstrap_servers, opts.kafka_failed_topic or f'{opts.kafka_output_topic}-failed')
  if streaming and io.output:
    scores | 'WriteScores' >> _WriteStreamingJsonLines(io.output, opts.write_frequency_secs)
    failed | 'WriteFailures' >> _WriteStreamingJsonLines(f'{io.output}-failed', opts.write_frequency_secs)
  elif io.output:
    scores = scores | 'GlobalScores' >> beam.WindowInto(beam.window.GlobalWindows())
    scores | 'WriteScores' >> WriteJsonLines(io.output)
    failed | 'WriteFailures' >> WriteJsonLines(f'{io.output}-failed')
  failed | 'CountDeadLetters' >> CountDeadLetters()
  if drift_enabled(options):
    window = writer = None  # batch: one drift report for the run (or --drift_window_size)
    if streaming:
      window = (opts.window_size, opts.window_period if opts.window == 'sliding' else None)
      writer = lambda prefix: _WriteStreamingJsonLines(prefix, opts.write_frequency_secs)
    score_sequences_drift(options, events, scores, fields, io.output, window, writer)
  return scores, failed


def latency_summary(result) -> dict:
  """{metric name: value} for this pipeline's latency and count metrics."""
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
      summary['latency_mean_ms'] = dist.committed.mean
      summary['latency_max_ms'] = dist.committed.max
  return summary


def run(argv=None, clock: Callable[[], float] = time.time):
  """Runs the pipeline to completion; returns Beam's PipelineResult."""
  options = cli.parse_options(
      argv, (IOOptions, ScoreSequencesOptions, InferenceOptions, DriftOptions, MetricsOptions),
      prog='python -m pipelines.score_sequences', description=__doc__)
  pipeline = beam.Pipeline(options=options)
  build(pipeline, options, clock)
  result = run_pipeline(pipeline, options, 'score_sequences')
  try:
    _log.info('score_sequences metrics: %s', latency_summary(result))
  except Exception as err:  # metrics are best-effort on some runners
    _log.warning('no metrics from this runner: %s', err)
  return result


if __name__ == '__main__':
  cli.main(run, 'score_sequences')
