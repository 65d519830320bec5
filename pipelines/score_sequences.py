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
"score",] "latency_s"}; `<output>_failed-*.jsonl`: dead letters (malformed
events, windows too short to score, failed inference) and late events
(stage "late"); with `--kafka_output_topic` the same records go to Kafka
topics instead of or beside the files. `latency_s` is output time minus the arrival time of the
newest event in the window; its p50/p99 are logged and exported as the
gauges `latency_p50_ms`/`latency_p99_ms` (plus the distribution
`latency_ms`) in the 'beam_dl.score_sequences' metrics namespace.

Drift: a batch run without --drift_profile compares a sample of 256 events'
value fields with the input profile training saved in the model directory
(field i is the model's input channel `input/<i>`): the gauges psi_e6/js_e6
in 'beam_dl.drift' and one warning line when they differ
(`transforms.drift.CheckAgainstTraining`; --drift_profile none: no check).

Timestamps: batch takes event times from the data (the "time" field);
streaming keeps the source's (file read time, Pub/Sub publish time or
`--timestamp_attribute`, Kafka record time), so windows follow the watermark.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_dl import cli
from beam_dl.cli.options import (
  DriftOptions,
  InferenceOptions,
  IOOptions,
  MetricsOptions,
  OptionsError,
  positive_int,
  require,
  switch,
)
from beam_dl.core.deadletter import failed_output
from beam_dl.features.windows import WindowSpec
from beam_dl.formats.events import EventSpec
from beam_dl.io.kafka import WriteKafkaJson
from beam_dl.models import checkpoints
from beam_dl.operations.metrics_export import run_pipeline
from beam_dl.serving.handler import JaxModelHandler, length_buckets_up_to
from transforms.drift import score_sequences_drift
from transforms.event_sources import KAFKA_READERS, EventSource, ReadEventLines
from transforms.inference import RunInferenceWithDeadLetters
from transforms.io import WriteJsonLines, WriteWindowedJsonLines
from transforms.metrics import CountDeadLetters
from transforms.sequence_scoring import (
  NAMESPACE,
  FormatScoreFn,
  LateDeadLetterFn,
  ToModelInputFn,
  latency_summary,
  restore_key,
)
from transforms.sequences import ParseEvents
from transforms.windowing import EventTimestamps, WindowedSequences

__all__ = ('ScoreSequencesOptions', 'build', 'run', 'window_spec', 'event_source', 'latency_summary', 'NAMESPACE')
_log = logging.getLogger(__name__)


class ScoreSequencesOptions(PipelineOptions):
  """Event fields, windowing, sources and scoring for score_sequences."""

  @classmethod
  def _add_argparse_args(cls, parser):
    add = parser.add_argument
    add('--event_key_field', default='key', help='JSON field holding the key (default key).')
    add('--event_time_field', default='time', help='JSON field holding event time, seconds (default time).')
    add('--event_value_fields', default='value', help='Comma-separated numeric fields: the F features.')
    add(
      '--window',
      choices=['fixed', 'sliding', 'session', 'global'],
      default='sliding',
      help='Event-time window kind (default sliding).',
    )
    add('--window_size', type=float, default=600.0, help='Window length, seconds (fixed, sliding).')
    add('--window_period', type=float, default=60.0, help='Sliding window step, seconds.')
    add('--session_gap', type=float, default=300.0, help='Session gap, seconds.')
    add('--allowed_lateness', type=float, default=0.0, help='Late events within this many seconds update windows.')
    add('--early_after_secs', type=float, default=None, help='EARLY panes every N seconds of processing time.')
    add(
      '--early_after_count',
      type=positive_int,
      default=None,
      help='EARLY panes every N events (streaming default 1: a score per event).',
    )
    add(
      '--accumulation',
      choices=['accumulating', 'discarding'],
      default='accumulating',
      help='Whether later panes of a window include earlier events (default accumulating).',
    )
    add('--seq_len', type=positive_int, default=32, help='Events per sequence: the last N of the window.')
    add(
      '--min_length',
      type=positive_int,
      default=None,
      help='Windows with fewer events are dead letters, not scored (default 1; 2 with --forecast).',
    )
    add(
      '--forecast',
      type=switch,
      nargs='?',
      const=True,
      default=False,
      help='Model predicts the last event from the ones before; score = mean |error| '
      '(--forecast or --forecast=true|false).',
    )
    add('--poll_interval_secs', type=float, default=1.0, help='Streaming from files: seconds between matches.')
    add(
      '--stop_after_secs',
      type=float,
      default=None,
      help='Streaming from files: stop watching after this many seconds (bounded runs, tests).',
    )
    add('--write_frequency_secs', type=float, default=5.0, help='Streaming: seconds between output file windows.')
    add('--input_topic', default=None, help='Pub/Sub topic to read events from (streaming).')
    add('--input_subscription', default=None, help='Pub/Sub subscription to read events from (streaming).')
    add('--timestamp_attribute', default=None, help='Pub/Sub attribute holding event timestamps.')
    add(
      '--kafka_bootstrap_servers',
      '--kafka_bootstrap',
      dest='kafka_bootstrap_servers',
      default=None,
      help='Kafka bootstrap servers, host:port[,host:port] (streaming).',
    )
    add('--kafka_topic', default=None, help='Kafka topic to read events from (record time = event time).')
    add(
      '--kafka_output_topic',
      default=None,
      help='Kafka topic to write score records to (JSON, keyed by event key); dead letters go to '
      '--kafka_failed_topic. With it, --output is optional.',
    )
    add(
      '--kafka_failed_topic',
      default=None,
      help='Kafka topic for dead letters and late events (default <kafka_output_topic>-failed).',
    )
    add(
      '--kafka_reader',
      choices=KAFKA_READERS,
      default='python',
      help='python: beam_dl.io.kafka (confluent-kafka, runs on any runner that runs Python SDFs); '
      "xlang: Beam's cross-language KafkaIO (Java; needs --kafka_expansion_service).",
    )
    add(
      '--kafka_expansion_service',
      default=None,
      help='xlang Kafka reader: host:port of a Java expansion service with KafkaIO '
      '(python -m beam_dl.services.kafka_io runs one beside a local Flink).',
    )
    add(
      '--kafka_max_records',
      type=int,
      default=None,
      help='xlang Kafka reader: end the read after this many records (bounded runs: tests, benchmarks).',
    )
    add(
      '--kafka_stop_after_idle_secs',
      type=float,
      default=None,
      help='Kafka (python reader): end the read once a partition has had no record for this long '
      '(bounded runs: tests, benchmarks).',
    )


class FlinkLatencyOptions(PipelineOptions):
  """Flink's latency knobs, passed through to Beam's Flink job server (Java FlinkPipelineOptions).

  Declared here so the command line accepts them (beam_dl refuses unknown
  flags) and Beam sends them to the job server, which reads them by name.
  """

  @classmethod
  def _add_argparse_args(cls, parser):
    add = parser.add_argument
    add(
      '--max_bundle_size',
      type=int,
      default=None,
      help="Flink: elements per bundle at most (Flink default 1000); a bundle's output leaves when it ends.",
    )
    add(
      '--max_bundle_time_mills',
      type=int,
      default=None,
      help='Flink: milliseconds a bundle stays open at most (Flink default 1000): the latency floor.',
    )
    add(
      '--checkpointing_interval', type=int, default=None, help='Flink: milliseconds between checkpoints (default off).'
    )
    add(
      '--auto_watermark_interval',
      type=int,
      default=None,
      help='Flink: milliseconds between watermark emissions (default 200).',
    )


def window_spec(opts: ScoreSequencesOptions, streaming: bool) -> WindowSpec:
  """The windowing from the flags; streaming defaults to a score per event."""
  early_count = opts.early_after_count
  if streaming and early_count is None and opts.early_after_secs is None:
    early_count = 1
  return WindowSpec(
    kind=opts.window,
    size=opts.window_size,
    period=opts.window_period if opts.window == 'sliding' else None,
    gap=opts.session_gap if opts.window == 'session' else None,
    allowed_lateness=opts.allowed_lateness,
    early_after_secs=opts.early_after_secs,
    early_after_count=early_count,
    accumulation=opts.accumulation,
  )


def event_source(opts: ScoreSequencesOptions, io: IOOptions, streaming: bool) -> EventSource:
  """Where the events come from, from the flags."""
  return EventSource(
    input=io.input,
    streaming=streaming,
    poll_interval_secs=opts.poll_interval_secs,
    stop_after_secs=opts.stop_after_secs,
    pubsub_topic=opts.input_topic,
    pubsub_subscription=opts.input_subscription,
    timestamp_attribute=opts.timestamp_attribute,
    kafka_bootstrap=opts.kafka_bootstrap_servers,
    kafka_topic=opts.kafka_topic,
    kafka_reader=opts.kafka_reader,
    kafka_stop_after_idle_secs=opts.kafka_stop_after_idle_secs,
    kafka_expansion_service=opts.kafka_expansion_service,
    kafka_max_records=opts.kafka_max_records,
  )


def model_shapes(seq_len: int, streaming: bool) -> dict:
  """The handler's padded lengths: those a sequence of `seq_len` steps can reach. Streaming compiles every
  shape when the model loads (`compile_ahead`): its batches come in every size, and a compile mid-stream
  stalls scoring for its duration."""
  return {'length_buckets': length_buckets_up_to(seq_len), 'compile_ahead': streaming}


def build(pipeline: beam.Pipeline, options: PipelineOptions, clock: Callable[[], float] = time.time):
  """Adds the scoring steps to `pipeline`; returns (scores, failed)."""
  opts, io = options.view_as(ScoreSequencesOptions), options.view_as(IOOptions)
  inference = options.view_as(InferenceOptions)
  streaming = options.view_as(StandardOptions).streaming
  source = event_source(opts, io, streaming)
  external = source.unbounded
  require(options, 'model_dir', *(() if opts.kafka_output_topic else ('output',)), *(() if external else ('input',)))
  if opts.kafka_topic or opts.kafka_output_topic:
    require(options, 'kafka_bootstrap_servers')
  if external and not streaming:
    # Pub/Sub and Kafka are unbounded: they imply streaming. Turned on here
    # because a Flex Template can't pass Beam's store_true --streaming.
    options.view_as(StandardOptions).streaming = streaming = True
    logging.getLogger(__name__).info('streaming mode turned on for the unbounded source')
  if not streaming and not external:
    cli.require_matches(io.input)
  spec, _ = checkpoints.load(inference.model_dir)  # a model that won't load is refused before the job starts
  fields = tuple(f.strip() for f in opts.event_value_fields.split(',') if f.strip())
  if not spec.is_sequence or tuple(spec.input_shape[1:]) != (len(fields),):
    raise OptionsError(
      f'{inference.model_dir}: model input {spec.input_shape} does not take sequences '
      f'of the {len(fields)} --event_value_fields {fields}'
    )
  event_spec = EventSpec(value_fields=fields, key_field=opts.event_key_field, time_field=opts.event_time_field)
  try:
    windows = window_spec(opts, streaming)
  except ValueError as e:  # a size, period, gap or lateness out of range
    raise OptionsError(f'--window {opts.window}: {e}') from None
  if io.output:
    cli.require_writable(io.output)  # last: it makes the output's directory

  lines = pipeline | 'ReadEvents' >> ReadEventLines(source, clock, NAMESPACE)
  parsed = lines | 'ParseEvents' >> ParseEvents(event_spec, with_timestamps=not streaming)
  events = parsed.events | 'Timestamps' >> EventTimestamps(from_source=True)
  sequences = events | 'Sequences' >> WindowedSequences(
    windows, opts.seq_len, num_features=len(fields), route_late=streaming, clock=clock
  )
  examples = sequences.records | 'ToExamples' >> beam.ParDo(
    ToModelInputFn(opts.forecast, opts.min_length, clock=clock)
  ).with_outputs('failed', main='examples')
  handler = JaxModelHandler(inference.model_dir, **inference.handler_kwargs(), **model_shapes(opts.seq_len, streaming))
  # RunInference batches per window, and each pane is its own window's: in the
  # global window a bundle's panes, of every key and window, make one model call.
  # The window and pane travel in the context.
  to_score = examples.examples | 'OneModelCallPerBundle' >> beam.WindowInto(beam.window.GlobalWindows())
  inferred = to_score | 'Score' >> RunInferenceWithDeadLetters(handler, dispatch_ahead=inference.dispatch_ahead)
  extra = spec.extra or {}
  scores = inferred.predictions | 'FormatScores' >> beam.ParDo(
    FormatScoreFn(
      float(extra.get('target_scale', 1.0)),
      float(extra.get('target_offset', 0.0)),
      clock=clock,
      live_source=source.unbounded,
    )
  )
  failures = {
    'Parse': parsed.failed,
    'Sequence': examples.failed,
    'Inference': inferred.failed | 'RestoreKeys' >> beam.Map(restore_key),
    'Late': sequences.late | 'LateToDeadLetters' >> beam.ParDo(LateDeadLetterFn(clock)),
  }
  failed = [
    pcoll | f'Global{name}Failures' >> beam.WindowInto(beam.window.GlobalWindows()) for name, pcoll in failures.items()
  ] | 'AllFailures' >> beam.Flatten()
  if opts.kafka_output_topic:
    scores | 'ScoresToKafka' >> WriteKafkaJson(opts.kafka_bootstrap_servers, opts.kafka_output_topic)
    failed | 'FailuresToKafka' >> WriteKafkaJson(
      opts.kafka_bootstrap_servers, opts.kafka_failed_topic or f'{opts.kafka_output_topic}-failed'
    )
  if streaming and io.output:
    scores | 'WriteScores' >> WriteWindowedJsonLines(io.output, opts.write_frequency_secs)
    failed | 'WriteFailures' >> WriteWindowedJsonLines(failed_output(io.output), opts.write_frequency_secs)
  elif io.output:
    scores = scores | 'GlobalScores' >> beam.WindowInto(beam.window.GlobalWindows())
    scores | 'WriteScores' >> WriteJsonLines(io.output)
    failed | 'WriteFailures' >> WriteJsonLines(failed_output(io.output))
  failed | 'CountDeadLetters' >> CountDeadLetters()
  window = writer = None  # batch: one drift report for the run (or --drift_window_size)
  if streaming:
    window = (opts.window_size, opts.window_period if opts.window == 'sliding' else None)
    writer = lambda prefix: WriteWindowedJsonLines(prefix, opts.write_frequency_secs)
  # Without drift flags, a batch run checks its events against training's profile (if the model dir has one).
  score_sequences_drift(options, events, scores, fields, io.output, inference.model_dir, window, writer)
  return scores, failed


def run(argv=None, clock: Callable[[], float] = time.time):
  """Runs the pipeline to completion; returns Beam's PipelineResult."""
  options = cli.parse_options(
    argv,
    (IOOptions, ScoreSequencesOptions, InferenceOptions, DriftOptions, MetricsOptions, FlinkLatencyOptions),
    prog='python -m pipelines.score_sequences',
    description=__doc__,
  )
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
