"""Event records (JSON lines, CSV rows) and their per-key assembly into sequences.

An event is one timestamped observation of one key: a user's click, a
sensor's reading. `parse_json_event` / `parse_csv_event` turn one text line
into an `Event` (or raise `EventParseError` with the reason), and
`assemble_sequence` orders one key's events by time into a `SequenceRecord`.
Categorical ids stay strings here; `beam_dl.io.vocab` maps them to integers.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from beam_dl.io.sequences import SequenceRecord


class EventParseError(ValueError):
  """A line that is not a valid event; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Event:
  """One observation: key, event time, numeric features, optional id/label."""

  key: str
  time: float
  values: tuple[float, ...]
  id: str | None = None
  label: Any = None


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


def event_from_mapping(record: Mapping[str, Any], spec: EventSpec) -> Event:
  """An `Event` from one decoded record (dict of field -> value)."""
  if not isinstance(record, Mapping):
    raise EventParseError(f'expected an object, got {type(record).__name__}')
  key = record.get(spec.key_field)
  if key in (None, ''):
    raise EventParseError(f'missing field {spec.key_field!r}')
  event_id = None
  if spec.id_field:
    event_id = record.get(spec.id_field)
    if event_id in (None, ''):
      raise EventParseError(f'missing field {spec.id_field!r}')
    event_id = str(event_id)
  label = record.get(spec.label_field) if spec.label_field else None
  return Event(
      key=str(key),
      time=_number(record, spec.time_field),
      values=tuple(_number(record, f) for f in spec.value_fields),
      id=event_id,
      label=None if label == '' else label)


def parse_json_event(line: str | bytes, spec: EventSpec) -> Event:
  """One JSON line -> `Event`; bad JSON or fields raise `EventParseError`."""
  try:
    record = json.loads(line)
  except (ValueError, UnicodeDecodeError) as err:
    raise EventParseError(f'bad JSON: {err}') from None
  return event_from_mapping(record, spec)


def parse_csv_event(line: str | bytes, spec: EventSpec) -> Event:
  """One CSV row (columns `spec.csv_columns`) -> `Event`."""
  if not spec.csv_columns:
    raise ValueError('parse_csv_event needs spec.csv_columns')
  if isinstance(line, bytes):
    try:
      line = line.decode('utf-8')
    except UnicodeDecodeError as err:
      raise EventParseError(f'bad CSV row: not UTF-8 ({err})') from None
  try:
    rows = list(csv.reader([line], delimiter=spec.csv_delimiter, strict=True))
  except csv.Error as err:
    raise EventParseError(f'bad CSV row: {err}') from None
  if len(rows) != 1 or len(rows[0]) != len(spec.csv_columns):
    got = len(rows[0]) if rows else 0
    raise EventParseError(
        f'bad CSV row: {got} columns, expected {len(spec.csv_columns)} '
        f'({", ".join(spec.csv_columns)})')
  return event_from_mapping(dict(zip(spec.csv_columns, rows[0])), spec)


def assemble_sequence(key: str, events: Iterable[Event],
                      label_map: Mapping[Any, int] | None = None) -> SequenceRecord:
  """One key's events, ordered by event time (stable), as a `SequenceRecord`.

  Values are [T, F] float32; ids, when the events carry them, are kept as a
  string array in `meta['raw_ids']` until a vocabulary or hashing turns them
  into `ids`. The label is the last non-empty event label (mapped through
  `label_map` when given, else cast to int).
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
    label = label_map[labels[-1]] if label_map is not None else int(labels[-1])
  return SequenceRecord(key=key, values=values, label=label, meta=meta)
