"""Sequence PTransforms: parse, assemble, map ids, pad, bucket and chunk.

Typical pipelines:

  # Serialized SequenceExamples -> length-bucketed padded batches
  parsed = p | ReadSequenceExamples('gs://b/seq-*.tfrecord', SequenceSpec(num_features=3))
  batches = parsed.parsed | BucketByLength(boundaries=(16, 64, 256), batch_size=32)

  # Event logs -> per-key sequences with hashed item ids
  events = lines | ParseEvents(EventSpec(value_fields=('price',), id_field='item'))
  seqs = events.events | AssembleSequences()
  hashed = seqs.sequences | HashIds(num_buckets=100_000)

Each transform that can meet bad input returns a tuple with the good records
under its main tag and dead letters under `.failed`, as
`{'key', 'stage', 'reason'}` dicts; nothing is dropped silently. Counters live
in the 'beam_dl.sequences' namespace.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence, Tuple

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from beam_dl.core.deadletter import FAILED, ErrorHandling, dead_letter
from beam_dl.core.element_types import DeadLetter, TextLine
from beam_dl.decoding import padding as padding_lib
from beam_dl.decoding.padding import PaddedBatch
from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.features import hashing
from beam_dl.features.batch_windows import events_block
from beam_dl.formats import events as events_lib
from beam_dl.formats import sequence_example
from beam_dl.formats.events import Event, EventSpec
from beam_dl.formats.sequence_example import SequenceSpec
from transforms.tfrecords import ReadTFRecords

NAMESPACE = 'beam_dl.sequences'
_RECORD_PREVIEW = 200


class _ParseRecordsFn(beam.DoFn):
  """Parses a batch of serialized protos with TF's vectorised parser."""

  def __init__(self, spec: SequenceSpec, fmt: str):
    self._spec = spec
    self._fmt = fmt
    self._parsed = Metrics.counter(NAMESPACE, 'parsed')
    self._failed = Metrics.counter(NAMESPACE, 'parse_failed')

  def setup(self):
    self._parse = (
      sequence_example.parse_sequence_examples
      if self._fmt == 'sequence_example'
      else sequence_example.parse_list_examples
    )

  def process(self, batch: list[bytes]):
    results = self._parse(batch, self._spec)
    failed = 0
    for raw, result in zip(batch, results):
      if isinstance(result, sequence_example.SequenceParseError):
        failed += 1
        Metrics.counter(NAMESPACE, 'parse_failed_' + _reason_kind(str(result))).inc()
        yield beam.pvalue.TaggedOutput(
          FAILED, dead_letter(sequence_example.own_key(raw, self._spec, self._fmt), 'parse', str(result), size=len(raw))
        )
      else:
        yield result
    self._parsed.inc(len(results) - failed)
    if failed:
      self._failed.inc(failed)


def _reason_kind(reason: str) -> str:
  """A short counter suffix for a failure reason."""
  for needle, kind in (
    ('missing', 'missing'),
    ('ragged', 'ragged'),
    ("don't match", 'wrong_type'),
    ('Invalid protocol', 'bad_bytes'),
    ('ids but', 'misaligned'),
  ):
    if needle in reason:
      return kind
  return 'other'


@beam.typehints.with_input_types(bytes)
class ParseSequenceExamples(ErrorHandling, beam.PTransform):
  """Serialized tf.train.SequenceExample (or list-feature Example) -> `SequenceRecord`.

  Args:
    spec: feature names and the declared step width.
    fmt: 'sequence_example' (feature lists) or 'example' (flat list features,
      needs `spec.num_features`).
    max_batch_size: records parsed per TF call (BatchElements adapts below it).
    error_threshold: fail the job when more than this fraction of records
      fail to parse (default 1: never); `with_error_handler(ErrorHandler(...))`
      also sends the dead letters to Beam's error handler.

  Returns a tuple with `.parsed` (SequenceRecord) and `.failed` (dead letters).
  """

  def __init__(
    self,
    spec: SequenceSpec = SequenceSpec(),
    fmt: str = 'sequence_example',
    max_batch_size: int = 512,
    *,
    error_threshold: float = 1.0,
  ):
    super().__init__()
    self._set_error_threshold(error_threshold)
    if fmt not in ('sequence_example', 'example'):
      raise ValueError(f"fmt must be 'sequence_example' or 'example', got {fmt!r}")
    if fmt == 'example' and not spec.num_features:
      raise ValueError("fmt='example' needs spec.num_features")
    self._spec, self._fmt, self._max_batch_size = spec, fmt, max_batch_size

  def expand(self, records):
    outputs = (
      records
      | 'Batch' >> beam.BatchElements(min_batch_size=min(32, self._max_batch_size), max_batch_size=self._max_batch_size)
      | 'Parse'
      >> beam.ParDo(_ParseRecordsFn(self._spec, self._fmt))
      .with_output_types(SequenceRecord, **{FAILED: DeadLetter})
      .with_outputs(FAILED, main='parsed')
    )
    self._report_failures(records, outputs.failed)
    return outputs


class ReadSequenceExamples(beam.PTransform):
  """TFRecord files of SequenceExample (or list-feature Example) -> `SequenceRecord`.

  Returns `.parsed` and `.failed` like `ParseSequenceExamples`; `.failed`
  also holds damaged TFRecord frames and unreadable files (`ReadTFRecords`).
  """

  def __init__(
    self,
    file_pattern: str,
    spec: SequenceSpec = SequenceSpec(),
    fmt: str = 'sequence_example',
    compression_type: str = 'auto',
  ):
    super().__init__()
    self._pattern = file_pattern
    self._parse = ParseSequenceExamples(spec, fmt)
    self._compression = compression_type

  def expand(self, pbegin):
    read = pbegin | 'ReadTFRecord' >> ReadTFRecords(self._pattern, self._compression)
    parsed = read.records | 'DropFilenames' >> beam.Values() | 'ParseSequenceExamples' >> self._parse
    failed = (read.failed, parsed.failed) | 'MergeFailures' >> beam.Flatten()
    return ParsedSequences(parsed.parsed, failed)


class ParsedSequences(NamedTuple):
  """ReadSequenceExamples' outputs: `SequenceRecord`s and dead letters."""

  parsed: beam.PCollection
  failed: beam.PCollection


class _ParseEventFn(beam.DoFn):
  def __init__(self, spec: EventSpec, fmt: str, with_timestamps: bool = False):
    self._spec, self._fmt, self._with_timestamps = spec, fmt, with_timestamps
    self._ok = Metrics.counter(NAMESPACE, 'events_parsed')
    self._bad = Metrics.counter(NAMESPACE, 'events_failed')

  def setup(self):
    self._parse = events_lib.parse_json_event if self._fmt == 'json' else events_lib.parse_csv_event

  def process(self, line):
    try:
      event = self._parse(line, self._spec)
    except events_lib.EventParseError as err:
      self._bad.inc()
      yield _parse_event_failure(err, line)
      return
    self._ok.inc()
    yield beam.window.TimestampedValue(event, event.time) if self._with_timestamps else event


def _parse_event_failure(err: events_lib.EventParseError, line) -> beam.pvalue.TaggedOutput:
  """The dead letter of a line that is not an event, with a preview of it."""
  preview = line if isinstance(line, str) else line.decode('utf-8', 'backslashreplace')
  return beam.pvalue.TaggedOutput(
    FAILED, dead_letter(err.key, 'parse_event', str(err), record=preview[:_RECORD_PREVIEW])
  )


@beam.typehints.with_input_types(TextLine)
class ParseEvents(beam.PTransform):
  """Text lines (JSON objects or CSV rows) -> `Event`.

  Lines may be str or bytes (bytes are decoded as UTF-8 here, so a line that
  is not UTF-8 is a dead letter rather than a reader crash). Returns a tuple
  with `.events` and `.failed` (bad UTF-8, bad JSON, bad CSV row, missing or
  non-numeric fields, an event time outside Beam's timestamp range; each dead
  letter keeps a preview of the line, and the record's key once it was read).
  `with_timestamps=True` gives each event its event time (seconds since the
  epoch) as the element timestamp, for windowing (e.g. session windows before
  `AssembleSequences`).
  """

  def __init__(self, spec: EventSpec, fmt: str = 'json', with_timestamps: bool = False):
    super().__init__()
    if fmt not in ('json', 'csv'):
      raise ValueError(f"fmt must be 'json' or 'csv', got {fmt!r}")
    if fmt == 'csv' and not spec.csv_columns:
      raise ValueError("fmt='csv' needs spec.csv_columns")
    self._spec, self._fmt, self._with_timestamps = spec, fmt, with_timestamps

  def expand(self, lines):
    return lines | 'ParseEvent' >> beam.ParDo(
      _ParseEventFn(self._spec, self._fmt, self._with_timestamps)
    ).with_output_types(Event, **{FAILED: DeadLetter}).with_outputs(FAILED, main='events')


class ReadEvents(beam.PTransform):
  """Text files of events (JSON lines, or CSV with `skip_header_lines`) -> `Event`.

  `ReadFromText` (as bytes: decoding is ParseEvents' job, per line) then
  `ParseEvents`; returns `.events` and `.failed`.
  """

  def __init__(
    self,
    file_pattern: str,
    spec: EventSpec,
    fmt: str = 'json',
    skip_header_lines: int = 0,
    with_timestamps: bool = False,
  ):
    super().__init__()
    self._pattern, self._skip = file_pattern, skip_header_lines
    self._parse = ParseEvents(spec, fmt, with_timestamps)

  def expand(self, pbegin):
    return (
      pbegin
      | 'ReadText' >> beam.io.ReadFromText(self._pattern, skip_header_lines=self._skip, coder=coders.BytesCoder())
      | 'ParseEvents' >> self._parse
    )


class _ParseEventBlocksFn(_ParseEventFn):
  """A matched text file -> `EventBlock`s of up to `block_size` events, and
  a dead letter per bad line (the same as `ParseEvents` per line)."""

  def __init__(self, spec: EventSpec, fmt: str, skip_header_lines: int, block_size: int):
    super().__init__(spec, fmt)
    self._skip, self._block_size = skip_header_lines, block_size

  def process(self, readable_file):
    events = []
    with readable_file.open() as lines:
      for number, line in enumerate(lines):
        if number < self._skip:
          continue
        if line.endswith(b'\n'):  # lines as ReadFromText gives them: without '\n' or '\r\n'
          line = line[:-2] if line.endswith(b'\r\n') else line[:-1]
        try:
          events.append(self._parse(line, self._spec))
        except events_lib.EventParseError as err:
          self._bad.inc()
          yield _parse_event_failure(err, line)
          continue
        if len(events) == self._block_size:
          self._ok.inc(len(events))
          yield events_block(events)
          events = []
    if events:
      self._ok.inc(len(events))
      yield events_block(events)


class ReadEventBlocks(beam.PTransform):
  """Text files of events -> columnar `EventBlock`s, for
  `WindowedFeatures(spec, event_blocks=True)`.

  What `ReadEvents` reads, without a Beam element per event: each matched
  file is parsed line by line inside one DoFn call and handed on in blocks of
  `block_size` events, each stamped with its own `time` (as
  `EventTimestamps()`). Returns `.events` (blocks) and `.failed` (the same
  dead letters as `ReadEvents`). A file is read by one worker: split big
  inputs into several files for parallelism.
  """

  def __init__(
    self, file_pattern: str, spec: EventSpec, fmt: str = 'json', skip_header_lines: int = 0, block_size: int = 10_000
  ):
    super().__init__()
    ParseEvents(spec, fmt)  # validates spec and fmt
    if block_size < 1:
      raise ValueError(f'block_size must be >= 1, got {block_size}')
    self._pattern = file_pattern
    self._parse = _ParseEventBlocksFn(spec, fmt, skip_header_lines, block_size)

  def expand(self, pbegin):
    return (
      pbegin
      | 'MatchFiles' >> fileio.MatchFiles(self._pattern)
      | 'ReadMatches' >> fileio.ReadMatches()
      | 'ParseEventBlocks' >> beam.ParDo(self._parse).with_outputs(FAILED, main='events')
    )


class _AssembleFn(beam.DoFn):
  def __init__(self, label_map, min_length: int):
    self._label_map, self._min_length = label_map, min_length
    self._ok = Metrics.counter(NAMESPACE, 'sequences_assembled')
    self._bad = Metrics.counter(NAMESPACE, 'assemble_failed')
    self._steps = Metrics.distribution(NAMESPACE, 'sequence_length')

  def process(self, keyed):
    key, events = keyed
    events = list(events)
    if len(events) < self._min_length:
      self._bad.inc()
      yield beam.pvalue.TaggedOutput(
        FAILED, dead_letter(key, 'assemble', f'{len(events)} events, fewer than min_length={self._min_length}')
      )
      return
    try:
      record = events_lib.assemble_sequence(key, events, self._label_map)
    except (KeyError, ValueError, TypeError) as err:
      self._bad.inc()
      yield beam.pvalue.TaggedOutput(FAILED, dead_letter(key, 'assemble', f'bad label: {err!r}'))
      return
    self._ok.inc()
    self._steps.update(record.length)
    yield record


@beam.typehints.with_input_types(Event)
class AssembleSequences(beam.PTransform):
  """`Event`s -> one `SequenceRecord` per key, steps ordered by event time.

  Works in any windowing: in a global window (batch) a key's whole history is
  one sequence; under session or fixed windows each window is one sequence.

  Args:
    label_map: maps raw event labels to class ids (else labels are cast to int).
    min_length: keys with fewer events go to `.failed`.

  Returns a tuple with `.sequences` and `.failed`.
  """

  def __init__(self, label_map: Mapping[Any, int] | None = None, min_length: int = 1):
    super().__init__()
    self._label_map = dict(label_map) if label_map is not None else None
    self._min_length = min_length

  def expand(self, events):
    return (
      events
      | 'KeyByEventKey' >> beam.Map(lambda e: (e.key, e)).with_input_types(Event).with_output_types(Tuple[str, Event])
      | 'GroupByKey' >> beam.GroupByKey()
      | 'Assemble'
      >> beam.ParDo(_AssembleFn(self._label_map, self._min_length))
      .with_output_types(SequenceRecord, **{FAILED: DeadLetter})
      .with_outputs(FAILED, main='sequences')
    )


class _HashIdsFn(beam.DoFn):
  """Sets `ids` by hashing the raw string ids (or re-hashing integer ids)."""

  def __init__(self, num_buckets: int):
    self._buckets = num_buckets
    self._ok = Metrics.counter(NAMESPACE, 'ids_mapped')
    self._bad = Metrics.counter(NAMESPACE, 'ids_failed')

  def process(self, record: SequenceRecord):
    raw = record.meta.get('raw_ids')
    if raw is None and record.ids is not None:
      raw = record.ids  # integer ids re-hashed into a smaller space
    if raw is None:
      self._bad.inc()
      yield beam.pvalue.TaggedOutput(
        FAILED, dead_letter(record.key, 'ids', 'record has no raw ids to map (meta["raw_ids"])')
      )
      return
    self._ok.inc()
    meta = {k: v for k, v in record.meta.items() if k != 'raw_ids'}
    yield record.replace(ids=hashing.hash_ids(raw, self._buckets), meta=meta)


@beam.typehints.with_input_types(SequenceRecord)
class HashIds(beam.PTransform):
  """Categorical ids hashed into `num_buckets` (FarmHash64, as Keras `Hashing`).

  For sparse, high-cardinality ids (hash embeddings): no vocabulary pass
  needed. Vocabulary ids come from tf.Transform alone
  (`pipelines.preprocess`; served by `ApplySavedTransform`). Returns a tuple
  with `.sequences` and `.failed`.
  """

  def __init__(self, num_buckets: int):
    super().__init__()
    if num_buckets < 1:
      raise ValueError(f'num_buckets must be >= 1, got {num_buckets}')
    self._buckets = num_buckets

  def expand(self, records):
    return records | 'HashIds' >> beam.ParDo(_HashIdsFn(self._buckets)).with_output_types(
      SequenceRecord, **{FAILED: DeadLetter}
    ).with_outputs(FAILED, main='sequences')


class _PadFn(beam.DoFn):
  def __init__(self, boundaries, padding: str, truncating: str):
    self._boundaries, self._padding, self._truncating = boundaries, padding, truncating
    self._real = Metrics.counter(NAMESPACE, 'real_steps')
    self._padded = Metrics.counter(NAMESPACE, 'padding_steps')
    self._batches = Metrics.counter(NAMESPACE, 'batches')

  def process(self, bucket_and_records):
    bucket, records = bucket_and_records
    batch = padding_lib.pad_batch(list(records), self._boundaries[bucket], self._padding, self._truncating)
    real = int(batch.mask.sum())
    self._real.inc(real)
    self._padded.inc(int(batch.mask.size) - real)
    self._batches.inc()
    yield batch


@beam.typehints.with_input_types(SequenceRecord)
@beam.typehints.with_output_types(PaddedBatch)
class BucketByLength(beam.PTransform):
  """`SequenceRecord`s -> `PaddedBatch`es, each padded to its length bucket.

  Each record goes to the smallest boundary >= its length (longer ones are
  truncated to the last boundary) and `GroupIntoBatches` forms batches of
  `batch_size` within a bucket, so a batch's padding is bounded by the gap
  between boundaries and jit sees only len(boundaries) shapes. Counters
  'real_steps' / 'padding_steps' give the padding fraction.

  Args:
    boundaries: strictly increasing padded lengths, e.g. (16, 32, 64, 128).
    batch_size: records per batch (the last batch of a bucket may be smaller).
    padding, truncating: 'pre' or 'post' (Keras `pad_sequences` meaning).
    max_buffering_duration_secs: in streaming, emit a partial batch after
      this long (GroupIntoBatches' own option).
  """

  def __init__(
    self,
    boundaries: Sequence[int],
    batch_size: int,
    padding: str = 'post',
    truncating: str = 'pre',
    max_buffering_duration_secs: float | None = None,
  ):
    super().__init__()
    self._max_buffering = max_buffering_duration_secs
    self._boundaries = padding_lib.check_boundaries(boundaries)
    padding_lib._check_side('padding', padding)  # pylint: disable=protected-access
    padding_lib._check_side('truncating', truncating)  # pylint: disable=protected-access
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self._batch_size, self._padding, self._truncating = batch_size, padding, truncating

  def expand(self, records):
    boundaries = self._boundaries
    return (
      records
      | 'KeyByBucket'
      >> beam.Map(lambda r: (padding_lib.bucket_index(r.length, boundaries), r))
      .with_input_types(SequenceRecord)
      .with_output_types(Tuple[int, SequenceRecord])
      | 'GroupIntoBatches' >> beam.GroupIntoBatches(self._batch_size, max_buffering_duration_secs=self._max_buffering)
      | 'Pad' >> beam.ParDo(_PadFn(boundaries, self._padding, self._truncating)).with_output_types(PaddedBatch)
    )


@beam.typehints.with_input_types(SequenceRecord)
@beam.typehints.with_output_types(PaddedBatch)
class PadSequences(beam.PTransform):
  """`SequenceRecord`s -> `PaddedBatch`es of one fixed `length` (no bucketing).

  Truncates longer sequences ('pre' keeps the latest steps) and pads shorter
  ones; use `BucketByLength` when lengths vary a lot.
  """

  def __init__(self, length: int, batch_size: int, padding: str = 'post', truncating: str = 'pre'):
    super().__init__()
    self._bucket = BucketByLength((length,), batch_size, padding, truncating)

  def expand(self, records):
    return records | 'PadToLength' >> self._bucket


@beam.typehints.with_input_types(SequenceRecord)
@beam.typehints.with_output_types(SequenceRecord)
class ChunkSequences(beam.PTransform):
  """`SequenceRecord`s -> fixed windows of `window` steps (truncated BPTT).

  Chunk keys are '<key>/<index>' and meta holds source_key, chunk, num_chunks
  and start; see `beam_dl.decoding.padding.chunk`.
  """

  def __init__(self, window: int, stride: int | None = None, drop_remainder: bool = False):
    super().__init__()
    if window < 1:
      raise ValueError(f'window must be >= 1, got {window}')
    self._window, self._stride, self._drop = window, stride, drop_remainder

  def expand(self, records):
    window, stride, drop = self._window, self._stride, self._drop
    return records | 'Chunk' >> beam.FlatMap(lambda r: padding_lib.chunk(r, window, stride, drop)).with_input_types(
      SequenceRecord
    ).with_output_types(SequenceRecord)
