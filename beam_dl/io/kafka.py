"""Kafka records in and out of a Beam pipeline with the confluent-kafka client (librdkafka).

    lines = p | ReadKafkaValues('127.0.0.1:9092', 'events')        # unbounded
    lines = p | ReadKafkaValues(servers, 'events', stop_after_idle_s=5)  # ends once idle (tests)
    records | WriteKafkaJson(servers, 'scores', key_field='key')

`ReadKafkaValues` is a splittable DoFn over the topic's partitions: each
partition is an offset range claimed record by record; every record is
emitted with its Kafka timestamp (CreateTime: the producer's event time),
and a monotonic watermark estimator moves the watermark with the newest
record timestamp seen in the partition, as KafkaIO's create-time policy
does. A record older than that watermark is out of order; windows it
belongs to may already be closed (the late-data gate routes it).

This is the Python route, for runners that run Python SDFs (the
DirectRunner, Prism, Flink and Dataflow through the portable framework).

`ReadKafkaXlang` is Beam's cross-language KafkaIO (Java, through an
expansion service; `beam_dl.services.kafka_io` runs one on Flink here):
record values with the record's CreateTime as timestamp.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import MonotonicWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration

from beam_dl.formats.jsonl import json_line

_NAMESPACE = 'beam_dl.io.kafka'
_UNBOUNDED = sys.maxsize


def _consumer(servers: str, **config):
  from confluent_kafka import Consumer  # pylint: disable=g-import-not-at-top

  return Consumer(
    {
      'bootstrap.servers': servers,
      'group.id': 'beam_dl',
      'enable.auto.commit': False,
      'enable.partition.eof': False,
      'log_level': 3,
      **config,
    }
  )


class Partition(NamedTuple):
  """One partition to read, with where to find it: the SDF's element."""

  servers: str
  topic: str
  partition: int
  from_beginning: bool
  timeout_s: float


class _PartitionsFn(beam.DoFn):
  """topic -> a `Partition` for each of its partitions (listed at run time)."""

  def __init__(self, servers: str, from_beginning: bool, timeout_s: float):
    self._servers, self._from_beginning, self._timeout = servers, from_beginning, timeout_s

  def process(self, topic: str) -> Iterable[Partition]:
    consumer = _consumer(self._servers)
    try:
      metadata = consumer.list_topics(topic, timeout=self._timeout).topics[topic]
      if metadata.error:
        raise RuntimeError(f'Kafka topic {topic}: {metadata.error}')
      for partition in sorted(metadata.partitions):
        yield Partition(self._servers, topic, partition, self._from_beginning, self._timeout)
    finally:
      consumer.close()


class _OffsetsProvider(RestrictionProvider):
  """A partition's restriction: [first offset to read, unbounded)."""

  def initial_restriction(self, element: Partition):
    from confluent_kafka import TopicPartition  # pylint: disable=g-import-not-at-top

    consumer = _consumer(element.servers)
    try:
      low, high = consumer.get_watermark_offsets(
        TopicPartition(element.topic, element.partition), timeout=element.timeout_s
      )
    finally:
      consumer.close()
    return OffsetRange(low if element.from_beginning else high, _UNBOUNDED)

  def create_tracker(self, restriction):
    return OffsetRestrictionTracker(restriction)

  def restriction_size(self, element, restriction):
    return 1  # unbounded: the size of what is left is unknown

  def split(self, element, restriction):
    yield restriction  # one reader per partition, in offset order


class _MonotonicFromStart(WatermarkEstimatorProvider):
  """Beam's monotonic estimator (watermark = newest record time seen), starting at the minimum.

  Its default provider starts at None, which the FnApiRunner cannot encode
  when it checkpoints a partition before the first record.
  """

  def initial_estimator_state(self, element, restriction):
    return MIN_TIMESTAMP

  def create_watermark_estimator(self, estimator_state):
    return MonotonicWatermarkEstimator(estimator_state)


class _ReadPartitionFn(beam.DoFn):
  """(topic, partition) -> record values, timestamped with the record time.

  Each call reads for up to `poll_s` seconds, then hands the rest of the
  partition back to the runner (a checkpoint), so bundles stay short and
  the watermark moves. With `stop_after_idle_s`, a partition that has had
  no record for that long is done (bounded runs: tests, benchmarks). The
  distribution `read_lag_ms` is the wall clock at reading minus the record
  time: the producer -> reader hop when the record time is the send time
  (Kafka's CreateTime, the producer's default).
  """

  def __init__(self, servers: str, poll_s: float, stop_after_idle_s: float | None, max_batch: int = 500):
    self._servers = servers
    self._poll_s = poll_s
    self._idle = stop_after_idle_s
    self._max_batch = max_batch
    self._records = beam.metrics.Metrics.counter(_NAMESPACE, 'records_read')
    self._errors = beam.metrics.Metrics.counter(_NAMESPACE, 'consumer_errors')
    self._lag_ms = beam.metrics.Metrics.distribution(_NAMESPACE, 'read_lag_ms')

  def setup(self):
    self._consumer = _consumer(self._servers, **{'fetch.wait.max.ms': 10})
    self._last_record: dict[tuple[str, int], float] = {}

  def teardown(self):
    self._consumer.close()

  def process(
    self,
    element: Partition,
    tracker=beam.DoFn.RestrictionParam(_OffsetsProvider()),
    watermark=beam.DoFn.WatermarkEstimatorParam(_MonotonicFromStart()),
  ):
    from confluent_kafka import TopicPartition  # pylint: disable=g-import-not-at-top

    del watermark  # observes each output's timestamp
    position = tracker.current_restriction().start
    self._consumer.assign([TopicPartition(element.topic, element.partition, position)])
    deadline = time.monotonic() + self._poll_s
    where = (element.topic, element.partition)
    last = self._last_record.setdefault(where, time.monotonic())
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      for message in self._consumer.consume(self._max_batch, timeout=remaining):
        if message.error():
          self._errors.inc()
          continue
        if not tracker.try_claim(message.offset()):
          return
        last = self._last_record[where] = time.monotonic()
        self._records.inc()
        record_ms = message.timestamp()[1]
        self._lag_ms.update(max(0, int(time.time() * 1000) - record_ms))
        yield beam.window.TimestampedValue(message.value(), record_ms / 1000.0)
    if self._idle is not None and time.monotonic() - last >= self._idle:
      tracker.try_claim(_UNBOUNDED - 1)  # claims the rest: this partition is done
      return
    tracker.defer_remainder(Duration(seconds=0))


@beam.typehints.with_output_types(bytes)
class ReadKafkaValues(beam.PTransform):
  """Values (bytes) of a topic's records, stamped with their Kafka record time."""

  def __init__(
    self,
    servers: str,
    topic: str,
    *,
    from_beginning: bool = True,
    poll_s: float = 0.05,
    stop_after_idle_s: float | None = None,
    timeout_s: float = 30.0,
  ):
    super().__init__()
    self._topic = topic
    self._partitions = _PartitionsFn(servers, from_beginning, timeout_s)
    self._read = _ReadPartitionFn(servers, poll_s, stop_after_idle_s)

  def expand(self, pbegin):
    return (
      pbegin
      | 'Topic' >> beam.Create([self._topic])
      | 'Partitions' >> beam.ParDo(self._partitions)
      | 'ReadPartitions' >> beam.ParDo(self._read)
    )


# The payload of KafkaIO's cross-language read, as Beam 2.62's Java expects it.
# Python 2.77's `ReadFromKafka` sends three more fields
# (dynamic_read_poll_interval_seconds, consumer_factory_fn_class/_params); an
# expansion service from an older Beam refuses the whole request ("missing a
# setter setDynamicReadPollIntervalSeconds"), even when they are null. These
# are the fields of `KafkaIO.Read.External.Configuration` in 2.62 (newer Javas
# accept them too). Functional form: the schema is inferred from real types,
# which this module's postponed annotations would turn into strings.
KafkaReadConfig = NamedTuple(
  'KafkaReadConfig',
  [
    ('consumer_config', Mapping[str, str]),
    ('topics', list[str]),
    ('key_deserializer', str),
    ('value_deserializer', str),
    ('start_read_time', Optional[int]),
    ('max_num_records', Optional[int]),
    ('max_read_time', Optional[int]),
    ('commit_offset_in_finalize', bool),
    ('timestamp_policy', str),
    ('consumer_polling_timeout', Optional[int]),
    ('redistribute', Optional[bool]),
    ('redistribute_num_keys', Optional[np.int32]),
    ('allow_duplicates', Optional[bool]),
  ],
)


@beam.typehints.with_output_types(bytes)
class ReadKafkaXlang(beam.PTransform):
  """Values (bytes) of a topic's records through Beam's Java KafkaIO, stamped with their CreateTime.

  `expansion_service`: 'host:port' of a Java expansion service with KafkaIO
  on its classpath. From the earliest offset (like `ReadKafkaValues`);
  `max_num_records` bounds the read (tests, benchmarks).
  """

  URN = 'beam:transform:org.apache.beam:kafka_read_without_metadata:v1'
  BYTES = 'org.apache.kafka.common.serialization.ByteArrayDeserializer'

  def __init__(
    self,
    servers: str,
    topic: str,
    expansion_service: str,
    *,
    max_num_records: int | None = None,
    consumer_config: Mapping[str, str] | None = None,
  ):
    super().__init__()
    self._config = KafkaReadConfig(
      consumer_config={'bootstrap.servers': servers, 'auto.offset.reset': 'earliest', **(consumer_config or {})},
      topics=[topic],
      key_deserializer=self.BYTES,
      value_deserializer=self.BYTES,
      start_read_time=None,
      max_num_records=max_num_records,
      max_read_time=None,
      commit_offset_in_finalize=False,
      timestamp_policy='CreateTime',
      consumer_polling_timeout=2,
      redistribute=False,
      redistribute_num_keys=np.int32(0),
      allow_duplicates=False,
    )
    self._expansion_service = expansion_service

  def expand(self, pbegin):
    from apache_beam.transforms.external import ExternalTransform, NamedTupleBasedPayloadBuilder  # pylint: disable=g-import-not-at-top

    return (
      pbegin
      | 'KafkaIO' >> ExternalTransform(self.URN, NamedTupleBasedPayloadBuilder(self._config), self._expansion_service)
      # a record without a value (a tombstone) is b'': the parse step's dead letter
      | 'KafkaValues' >> beam.MapTuple(lambda _, value: b'' if value is None else value).with_output_types(bytes)
    )


class _ProduceJsonFn(beam.DoFn):
  """record -> a JSON message on `topic`, keyed by `record[key_field]`; flushed per bundle.

  The producer is per DoFn instance (one thread); a bundle is done only
  when the broker has acknowledged all of its messages, so a retried
  bundle never loses output (it may repeat it: at-least-once). The
  distribution `write_ack_ms` is each message's produce -> acknowledgement
  time (the bundle's end included: messages are flushed there).
  """

  def __init__(self, servers: str, topic: str, key_field: str | None, flush_timeout_s: float):
    self._servers, self._topic, self._key_field = servers, topic, key_field
    self._flush_timeout = flush_timeout_s
    self._sent = beam.metrics.Metrics.counter(_NAMESPACE, 'records_written')
    self._ack_ms = beam.metrics.Metrics.distribution(_NAMESPACE, 'write_ack_ms')

  def setup(self):
    from confluent_kafka import Producer  # pylint: disable=g-import-not-at-top

    self._producer = Producer(
      {'bootstrap.servers': self._servers, 'linger.ms': 0, 'acks': 'all', 'log_level': 0}
    )  # delivery errors come back through `_delivered`
    self._failed: list[str] = []

  def _delivered(self, err, _message, produced: float):
    if err is not None:
      self._failed.append(str(err))
    else:
      self._ack_ms.update(int((time.monotonic() - produced) * 1000))

  def process(self, record: dict[str, Any]):
    key = record.get(self._key_field) if self._key_field else None
    self._producer.produce(
      self._topic,
      json_line(record).encode('utf-8'),
      key=None if key is None else str(key).encode('utf-8'),
      on_delivery=functools.partial(self._delivered, produced=time.monotonic()),
    )
    self._producer.poll(0)
    self._sent.inc()

  def finish_bundle(self):
    left = self._producer.flush(self._flush_timeout)
    failed, self._failed = self._failed, []
    if left or failed:
      raise RuntimeError(f'Kafka {self._topic}: {left} message(s) unsent, {len(failed)} failed: {failed[:3]}')

  def teardown(self):
    self._producer.flush(self._flush_timeout)


@beam.typehints.with_input_types(Dict[str, Any])
class WriteKafkaJson(beam.PTransform):
  """Writes dict records as JSON messages to a Kafka topic (at least once)."""

  def __init__(self, servers: str, topic: str, *, key_field: str | None = 'key', flush_timeout_s: float = 30.0):
    super().__init__()
    self._fn = _ProduceJsonFn(servers, topic, key_field, flush_timeout_s)

  def expand(self, records):
    return records | 'Produce' >> beam.ParDo(self._fn)
