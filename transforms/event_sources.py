"""Event lines from where events live: files (batch or watched), Pub/Sub, Kafka.

    lines = p | ReadEventLines(EventSource(input='events/*.jsonl'))                     # batch
    lines = p | ReadEventLines(EventSource(input='incoming/*.jsonl', streaming=True))   # watched
    lines = p | ReadEventLines(EventSource(kafka_bootstrap='h:9092', kafka_topic='events'))
    events = lines | ParseEvents(spec)

Lines come out as bytes, never decoded here: `ParseEvents` decodes each as
UTF-8, so a line or message that is not is a `parse_event` dead letter that
says so (never silently repaired). Element timestamps are the source's:
the file's match time when watching, Pub/Sub publish time (or
`timestamp_attribute`), the Kafka record time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import apache_beam as beam
from apache_beam.coders import BooleanCoder, BytesCoder
from apache_beam.io import fileio
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from beam_dl.core.element_types import TextLine
from beam_dl.io.kafka import ReadKafkaValues, ReadKafkaXlang

NAMESPACE = 'beam_dl.event_sources'
KAFKA_READERS = ('python', 'xlang')


@dataclasses.dataclass(frozen=True)
class EventSource:
  """Where events are read from: one of files (`input`), Pub/Sub or Kafka.

  Attributes:
    input: a file glob: read once (batch) or, with `streaming`, watched for
      new files every `poll_interval_secs` until `stop_after_secs` (None:
      for ever).
    pubsub_topic / pubsub_subscription / timestamp_attribute: Pub/Sub.
    kafka_bootstrap / kafka_topic: Kafka. `kafka_reader` 'python' is
      `beam_dl.io.kafka.ReadKafkaValues` (confluent-kafka; ends after
      `kafka_stop_after_idle_secs` idle when set), 'xlang' is Beam's
      cross-language KafkaIO (`beam_dl.io.kafka.ReadKafkaXlang`) through
      the expansion service at `kafka_expansion_service` (host:port),
      ending after `kafka_max_records` records when set.
  """

  input: str | None = None
  streaming: bool = False
  poll_interval_secs: float = 1.0
  stop_after_secs: float | None = None
  pubsub_topic: str | None = None
  pubsub_subscription: str | None = None
  timestamp_attribute: str | None = None
  kafka_bootstrap: str | None = None
  kafka_topic: str | None = None
  kafka_reader: str = 'python'
  kafka_stop_after_idle_secs: float | None = None
  kafka_expansion_service: str | None = None
  kafka_max_records: int | None = None

  def __post_init__(self):
    if self.kafka_reader not in KAFKA_READERS:
      raise ValueError(f'kafka_reader must be one of {KAFKA_READERS}, got {self.kafka_reader!r}')
    if self.kafka_reader == 'xlang' and self.kafka_topic and not self.kafka_expansion_service:
      raise ValueError(
        'the xlang Kafka reader needs kafka_expansion_service (host:port of a Java expansion '
        'service with KafkaIO: python -m beam_dl.services.kafka_io runs one)'
      )

  @property
  def kind(self) -> str:
    """'pubsub', 'kafka', 'watch' (streaming files) or 'files' (batch)."""
    if self.pubsub_topic or self.pubsub_subscription:
      return 'pubsub'
    if self.kafka_topic:
      return 'kafka'
    return 'watch' if self.streaming else 'files'

  @property
  def unbounded(self) -> bool:
    """Pub/Sub and Kafka never end: a pipeline reading them is streaming."""
    return self.kind in ('pubsub', 'kafka')


def lines_of(readable_file) -> list[bytes]:
  """A matched file's lines, as bytes (ParseEvents decodes them)."""
  return readable_file.read().splitlines()


class FirstSightingFn(beam.DoFn):
  """(path, metadata) -> metadata the first time a path is seen.

  `MatchContinuously(has_deduplication=True)` (Beam's Watch) ends at once on
  the local FnApiRunner in Beam 2.77, so the watched-directory mode polls
  without deduplication and keeps one bit of state per path here instead.
  """

  SEEN = ReadModifyWriteStateSpec('seen', BooleanCoder())

  def __init__(self, metrics_namespace: str = NAMESPACE):
    self._new_files = beam.metrics.Metrics.counter(metrics_namespace, 'files_matched')

  def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
    if not seen.read():
      seen.write(True)
      self._new_files.inc()
      yield element[1]


def read_kafka(source: EventSource) -> beam.PTransform:
  """Kafka record values (bytes), stamped with the record time (the producer's event time)."""
  if source.kafka_reader == 'xlang':
    return ReadKafkaXlang(
      source.kafka_bootstrap,
      source.kafka_topic,
      source.kafka_expansion_service,
      max_num_records=source.kafka_max_records,
    )
  return ReadKafkaValues(
    source.kafka_bootstrap, source.kafka_topic, stop_after_idle_s=source.kafka_stop_after_idle_secs
  )


@beam.typehints.with_output_types(TextLine)
class ReadEventLines(beam.PTransform):
  """Event lines (bytes) from files (batch or watched), Pub/Sub or Kafka.

  The watched-directory and Kafka reads end with a Reshuffle, a stage
  boundary, and it keeps late data right. Beam 2.77's FnApiRunner (what the
  DirectRunner runs this pipeline on) takes the input watermark of the stage
  holding a splittable DoFn source (the file watch, the Kafka reader) from
  the Impulse before it, which is done at once: +inf. Without a boundary the FnApiRunner fuses the
  downstream stateful `LateDataGate` into that stage, so the gate's
  event-time timers fired right after the first file was read; the gate
  took every window of those keys as closed and sent each later event of
  them to `late`. After the boundary the gate's input watermark is the
  watch's output watermark, held while the watch still polls. Runners with
  per-element watermarks (Flink, Dataflow, Prism) were not affected; for
  them the Reshuffle is one extra shuffle of the raw lines. Beam's Java
  KafkaIO (`kafka_reader='xlang'`) is a Java stage of its own on the
  portable runners that take it, so it gets no Reshuffle.

  New files are counted as `files_matched` in `metrics_namespace`.
  """

  def __init__(self, source: EventSource, clock: Callable[[], float] = time.time, metrics_namespace: str = NAMESPACE):
    super().__init__()
    self._source, self._clock, self._namespace = source, clock, metrics_namespace

  def expand(self, pbegin):
    source = self._source
    kind = source.kind
    if kind == 'pubsub':
      return pbegin | 'ReadFromPubSub' >> beam.io.ReadFromPubSub(
        topic=source.pubsub_topic,
        subscription=source.pubsub_subscription,
        timestamp_attribute=source.timestamp_attribute,
      )
    if kind == 'kafka':
      records = pbegin | 'ReadFromKafka' >> read_kafka(source)
      return records if source.kafka_reader == 'xlang' else records | 'EndSourceStage' >> beam.Reshuffle()
    if kind == 'files':
      return pbegin | 'ReadText' >> beam.io.ReadFromText(source.input, coder=BytesCoder())
    stop = Timestamp.of(self._clock() + source.stop_after_secs) if source.stop_after_secs else MAX_TIMESTAMP
    return (
      pbegin
      | 'WatchFiles'
      >> fileio.MatchContinuously(
        source.input,
        interval=source.poll_interval_secs,
        has_deduplication=False,
        start_timestamp=Timestamp.of(self._clock()),
        stop_timestamp=stop,
      )
      | 'KeyByPath' >> beam.Map(lambda m: (m.path, m))
      | 'NewFilesOnly' >> beam.ParDo(FirstSightingFn(self._namespace))
      | 'ReadMatches' >> fileio.ReadMatches()
      | 'SplitLines' >> beam.FlatMap(lines_of)
      | 'EndSourceStage' >> beam.Reshuffle()
    )
