"""A processing-time trigger fails a batch GroupByKey on the FnApiRunner
(Beam 2.77).

The FnApiRunner groups a batch GroupByKey itself (`execution._GroupingBuffer`)
and, for any windowing other than the default, builds the trigger driver
with `trigger.create_trigger_driver(windowing, True)`: no clock (Beam's own
TODO, BEAM-7514). A trigger that asks for the time, `AfterProcessingTime`
alone or inside `Repeatedly` / `AfterWatermark(early=...)`, then fails the
job with `AttributeError: 'NoneType' object has no attribute 'time'` in
`TriggerContext.get_current_time`. The DirectRunner runs batch pipelines on
the FnApiRunner, so a streaming pipeline's windowing with early firings, or
a model watcher's repeated processing-time trigger, fails there.

Past that, the batch driver (`GeneralTriggerDriver.process_entire_key`,
whose only caller is this batch path) ends a key with
`InMemoryUnmergedState.get_and_clear_timers()`, which compares
processing-time timers with `processing_time=None` and raises `TypeError`.

The fix gives a driver built without a clock the real clock, as Beam's
streaming DirectRunner does (`RealClock`), and ends a key's batch input with
every timer due, processing-time ones included: a key's input is complete,
so no later element can join a pane. Each element is in exactly one pane.
"""

from __future__ import annotations

from apache_beam.runners.direct.clock import RealClock
from apache_beam.transforms import trigger
from apache_beam.utils.timestamp import MAX_TIMESTAMP

from beam_dl.beam_fixes import BeamFix

BEAM_CREATE_TRIGGER_DRIVER = trigger.create_trigger_driver
STATE = trigger.InMemoryUnmergedState
BEAM_GET_AND_CLEAR_TIMERS = STATE.__dict__['get_and_clear_timers']


def _create_trigger_driver(windowing, is_batch=False, phased_combine_fn=None, clock=None):
  return BEAM_CREATE_TRIGGER_DRIVER(windowing, is_batch, phased_combine_fn, RealClock() if clock is None else clock)


def _get_and_clear_timers(self, watermark=MAX_TIMESTAMP):
  """Every timer due at `watermark` and, the key's input being complete, every processing-time timer."""
  return self.get_timers(clear=True, watermark=watermark, processing_time=MAX_TIMESTAMP)[0]


def apply() -> bool:
  trigger.create_trigger_driver = _create_trigger_driver
  STATE.get_and_clear_timers = _get_and_clear_timers
  return True


def revert() -> None:
  trigger.create_trigger_driver = BEAM_CREATE_TRIGGER_DRIVER
  STATE.get_and_clear_timers = BEAM_GET_AND_CLEAR_TIMERS


FIX = BeamFix(
  'batch_trigger_clock',
  'a processing-time trigger fails a batch GroupByKey on the FnApiRunner',
  '>=2.77,<2.78',
  apply,
  revert,
)
