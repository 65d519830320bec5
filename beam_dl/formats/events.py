"""Event records (JSON lines, CSV rows) and their per-key assembly into sequences.

An event is one timestamped observation of one key: a user's click, a
sensor's reading. `parse_json_event` / `parse_csv_event` turn one text line
into an `Event` (or raise `EventParseError` with the reason), and
`assemble_sequence` orders one key's events by time into a `SequenceRecord`.
Categorical ids stay strings here: tf.Transform's vocabulary maps them to
integers (`pipelines.preprocess`), or `beam_dl.features.hashing` hashes them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from apache_beam import coders
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.formats.features import int64_label

# Event times must be Beam timestamps (int64 microseconds, at most the global
# window's end): beyond them windowing or encoding fails and takes the job down.
MIN_EVENT_TIME = MIN_TIMESTAMP.micros / 1e6
MAX_EVENT_TIME = GlobalWindow().max_timestamp().micros / 1e6


class EventParseError(ValueError):
  """A line that is not a valid event; the message is the reason.

  `key` is the record's key when it was read before the error, else None.
  """

  def __init__(self, message: str, key: str | None = None):
    super().__init__(message)
    self.key = key


@dataclasses.dataclass(frozen=True)
class Event:
  """One observation: key, event time, numeric features, optional id/label."""

  key: str
  time: float
  values: tuple[float, ...]
  id: str | None = None
  label: Any = None


class EventCoder(coders.Coder):
  """Encodes an `Event` as its fields (FastPrimitivesCoder), not as a pickle:
  events cross the shuffle of every windowed pipeline."""

  _fields = coders.FastPrimitivesCoder()

  def encode(self, value: Event) -> bytes:
    return self._fields.encode((value.key, value.time, tuple(value.values), value.id, value.label))

  def decode(self, encoded: bytes) -> Event:
    return Event(*self._fields.decode(encoded))

  def to_type_hint(self):
    return Event


coders.registry.register_coder(Event, EventCoder)


@dataclasses.dataclass(frozen=True)
class EventSpec:
  """Which fields of a record are the key, time, features, id and label.

  Attributes:
    value_fields: numeric fields forming each step's feature vector, in order.
    key_field, time_field: the sequence key and the event time (number).
    id_field: optional categorical id (kept as a string).
    label_field: optional per-key label; the last event's non-empty label wins.
    csv_columns: CSV column names in file order (CSV has no header per line).
    csv_delimiter: CSV field separator.
  """

  value_fields: Sequence[str] = ()
  key_field: str = 'key'
  time_field: str = 'time'
  id_field: str | None = None
  label_field: str | None = None
  csv_columns: Sequence[str] | None = None
  csv_delimiter: str = ','

  def __post_init__(self):
    if not self.value_fields and not self.id_field:
      raise ValueError('EventSpec needs value_fields or an id_field')


def _number(record: Mapping[str, Any], field: str) -> float:
  if field not in record or record[field] in (None, ''):
    raise EventParseError(f'missing field {field!r}')
  raw = record[field]
  if isinstance(raw, bool):
    raise EventParseError(f'field {field!r} must be a number, got {raw!r}')
  try:
    value = float(raw)
  except (TypeError, ValueError):
    raise EventParseError(f'field {field!r} must be a number, got {raw!r}') from None
  if not math.isfinite(value):
    raise EventParseError(f'field {field!r} is not finite: {raw!r}')
  return value


def _event_time(record: Mapping[str, Any], field: str) -> float:
  """The event time in seconds, checked to be a Beam timestamp."""
  time = _number(record, field)
  if not MIN_EVENT_TIME <= time <= MAX_EVENT_TIME:
    raise EventParseError(
      f"field {field!r} = {record[field]!r} is outside Beam's timestamp range "
      f'[{MIN_EVENT_TIME:.6g}, {MAX_EVENT_TIME:.6g}] seconds (milli- or microseconds '
      'sent as seconds?)'
    )
  return time


def event_from_mapping(record: Mapping[str, Any], spec: EventSpec) -> Event:
  """An `Event` from one decoded record (dict of field -> value).

  Errors after the key is read carry it (`EventParseError.key`).
  """
  if not isinstance(record, Mapping):
    raise EventParseError(f'expected an object, got {type(record).__name__}')
  key = record.get(spec.key_field)
  if key in (None, '') or isinstance(key, (dict, list)):
    raise EventParseError(
      f'missing field {spec.key_field!r}'
      if key in (None, '')
      else f'field {spec.key_field!r} must be a scalar, got {key!r}'
    )
  try:
    return _event(record, str(key), spec)
  except EventParseError as err:
    raise EventParseError(str(err), str(key)) from None


def _event(record: Mapping[str, Any], key: str, spec: EventSpec) -> Event:
  event_id = None
  if spec.id_field:
    event_id = record.get(spec.id_field)
    if event_id in (None, ''):
      raise EventParseError(f'missing field {spec.id_field!r}')
    event_id = str(event_id)
  label = record.get(spec.label_field) if spec.label_field else None
  return Event(
    key=key,
    time=_event_time(record, spec.time_field),
    values=tuple(_number(record, f) for f in spec.value_fields),
    id=event_id,
    label=None if label == '' else label,
  )


def _text(line: str | bytes) -> str:
  """A line as text; bytes must be UTF-8 (never silently replaced)."""
  if isinstance(line, str):
    return line
  try:
    return line.decode('utf-8')
  except UnicodeDecodeError as err:
    raise EventParseError(
      f'not valid UTF-8: {err.reason} at byte {err.start} ({line[err.start : err.start + 4]!r})'
    ) from None


def parse_json_event(line: str | bytes, spec: EventSpec) -> Event:
  """One JSON line -> `Event`; bad UTF-8, JSON or fields raise `EventParseError`."""
  text = _text(line)
  try:
    record = json.loads(text)
  except ValueError as err:
    raise EventParseError(f'bad JSON: {err}') from None
  return event_from_mapping(record, spec)


def parse_csv_event(line: str | bytes, spec: EventSpec) -> Event:
  """One CSV row (columns `spec.csv_columns`) -> `Event`."""
  if not spec.csv_columns:
    raise ValueError('parse_csv_event needs spec.csv_columns')
  line = _text(line)
  try:
    rows = list(csv.reader([line], delimiter=spec.csv_delimiter, strict=True))
  except csv.Error as err:
    raise EventParseError(f'bad CSV row: {err}') from None
  if len(rows) != 1 or len(rows[0]) != len(spec.csv_columns):
    got = len(rows[0]) if rows else 0
    raise EventParseError(
      f'bad CSV row: {got} columns, expected {len(spec.csv_columns)} ({", ".join(spec.csv_columns)})'
    )
  return event_from_mapping(dict(zip(spec.csv_columns, rows[0])), spec)


def assemble_sequence(key: str, events: Iterable[Event], label_map: Mapping[Any, int] | None = None) -> SequenceRecord:
  """One key's events, ordered by event time (stable), as a `SequenceRecord`.

  Values are [T, F] float32; ids, when the events carry them, are kept as a
  string array in `meta['raw_ids']` until a vocabulary or hashing turns them
  into `ids`. The label is the last non-empty event label (mapped through
  `label_map` when given, else cast to int); a label that is not an integer
  or does not fit int64 raises ValueError.
  """
  ordered = sorted(events, key=lambda e: e.time)
  width = len(ordered[0].values) if ordered else 0
  values = np.asarray([e.values for e in ordered], np.float32).reshape(len(ordered), width)
  meta = {'times': np.asarray([e.time for e in ordered], np.float64)}
  if ordered and ordered[0].id is not None:
    meta['raw_ids'] = np.asarray([e.id for e in ordered], dtype=object)
  labels = [e.label for e in ordered if e.label is not None]
  label = None
  if labels:
    label = int64_label(label_map[labels[-1]] if label_map is not None else labels[-1])
  return SequenceRecord(key=key, values=values, label=label, meta=meta)
