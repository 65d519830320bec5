"""Routing late data to a side output instead of letting GroupByKey drop it.

Beam drops an element from a window at the GroupByKey once the watermark is
past `window.end + allowed_lateness`, and only counts it. Beam Python gives a
DoFn no way to read the watermark, but an event-time timer is a witness of
it: a timer set for time T fires only once the watermark has passed T.

`LateDataGate` is a stateful DoFn on `(key, event)` pairs in the global window,
placed before `WindowInto`. For each event it computes the windows the event
falls in (`WindowSpec.assign`) and their expiry times (end + lateness):

* an expiry already witnessed (<= the greatest fired timer of this key) means
  the window is closed: the event goes to the `late` output with that window's
  bounds, once per closed window;
* otherwise the expiry is added to the key's pending set and a timer is set
  for the earliest pending expiry (plus 1 us: GroupByKey drops strictly after
  the expiry). In Beam's model a pending event-time timer holds the gate's
  output watermark, so the GroupByKey downstream cannot close a window before
  the gate has seen it close.

An event whose windows are all closed is not passed on; one that is late for
some of its (sliding) windows only is passed on for the others.

Limit (documented in docs/streaming.md): the gate learns the watermark per
key, from windows that key has had data for. The first event of a key, or
of a window later than every window the key has had, that arrives after the
watermark passed that window's expiry has no witness; it is passed on and
the GroupByKey drops it (counted by the runner, not routed). In batch the
watermark only moves at the end of input, so nothing is late.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from beam_dl.features.windows import WindowSpec

LATE = 'late'
_NAMESPACE = 'beam_dl.features.late'
_EPSILON = Duration(micros=1)


def late_record(key: Any, event_time: float, values, window_start: float, window_end: float, expiry: float) -> dict:
  """The `late` output: the event and the closed window it arrived for."""
  return {
    'key': key,
    'event_time': event_time,
    'values': list(values),
    'window_start': window_start,
    'window_end': window_end,
    'window_expiry': expiry,
    'reason': f'arrived after the watermark passed window end + allowed lateness ({expiry:g})',
  }


class LateDataGate(beam.DoFn):
  """(key, (event_time, values, ...)) -> main output, or `late` records.

  See the module docstring. Keys must have a deterministic coder. All of a
  key's bookkeeping is one small state cell, `(closed_until, armed,
  pending expiries)` in microseconds, written only when it changes (the
  first event of a window), so most events cost one state read.
  """

  GATE = ReadModifyWriteStateSpec('late_gate', PickleCoder())
  EXPIRY_TIMER = TimerSpec('expiry', TimeDomain.WATERMARK)

  def __init__(self, spec: WindowSpec):
    self._spec = spec
    self._late = beam.metrics.Metrics.counter(_NAMESPACE, 'late_events')
    self._on_time = beam.metrics.Metrics.counter(_NAMESPACE, 'on_time_events')

  def process(self, element, gate=beam.DoFn.StateParam(GATE), timer=beam.DoFn.TimerParam(EXPIRY_TIMER)):
    key, event = element
    closed_until, armed, pending = gate.read() or (None, None, frozenset())
    open_windows = 0
    fresh = set()
    for window in self._spec.assign(event[0]):
      expiry = self._spec.expiry(window)
      if closed_until is not None and expiry.micros <= closed_until:
        self._late.inc()
        yield beam.pvalue.TaggedOutput(
          LATE, late_record(key, event[0], event[1], float(window.start), float(window.end), float(expiry))
        )
      else:
        open_windows += 1
        if expiry.micros not in pending:
          fresh.add(expiry.micros)
    if fresh:
      pending = pending | fresh
      earliest = min(pending)
      if armed != earliest:
        armed = earliest
        timer.set(Timestamp(micros=earliest) + _EPSILON)
      gate.write((closed_until, armed, pending))
    if open_windows:
      self._on_time.inc()
      yield element

  @on_timer(EXPIRY_TIMER)
  def on_expiry(self, gate=beam.DoFn.StateParam(GATE), timer=beam.DoFn.TimerParam(EXPIRY_TIMER)):
    # The timer was set for `armed` + 1 us (kept in state: runners differ in
    # what TimestampParam reports for a timer), so the watermark is past it.
    closed_until, armed, pending = gate.read() or (None, None, frozenset())
    if armed is None:
      return []
    closed_until = armed if closed_until is None else max(closed_until, armed)
    pending = frozenset(e for e in pending if e > armed)
    armed = min(pending) if pending else None
    if armed is not None:
      timer.set(Timestamp(micros=armed) + _EPSILON)
    gate.write((closed_until, armed, pending))
    return []
