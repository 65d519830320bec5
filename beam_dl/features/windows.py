"""Event-time window settings: window kind, lateness, early-result triggers.

`WindowSpec` is one place that says how events are grouped in time, and
turns into what Beam needs: the `WindowFn` (`window_fn()`), the
`beam.WindowInto` step (`window_into()`), and for late-data routing the
time after which a window no longer accepts data (`expiry()`).

Triggers: by default a window fires once when the watermark passes its end
(ON_TIME pane) and, when lateness is allowed, once more per late element
(LATE panes). `early_after_secs` / `early_after_count` add EARLY panes:
speculative results every so many seconds of processing time / events
before the watermark reaches the end of the window. `accumulation` says
whether a later pane of a window includes the events of earlier panes
('accumulating') or only the new ones ('discarding').

In batch (`is_batch`: a bounded input, not `--streaming`) every event is
read before the watermark moves, so a processing-time EARLY pane has nothing
early to show: `WindowSpec.as_run_on` drops `early_after_secs` there, and a
batch run gives the on-time panes only. It has to: Beam's FnApiRunner groups
batch input with a trigger driver that has no processing-time clock, so an
`AfterProcessingTime` trigger fails there on its first element
(`TriggerContext.get_current_time`: 'NoneType' object has no attribute
'time'). Count-based EARLY panes need no clock and stay.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms import trigger as tr
from apache_beam.transforms import window as bw
from apache_beam.utils.timestamp import Duration, Timestamp

KINDS = ('fixed', 'sliding', 'session', 'global')
ACCUMULATION = {
  'discarding': tr.AccumulationMode.DISCARDING,
  'accumulating': tr.AccumulationMode.ACCUMULATING,
}


def is_batch(pcoll: beam.PCollection) -> bool:
  """True when `pcoll` is bounded and the pipeline is not `--streaming`."""
  options = pcoll.pipeline._options  # pylint: disable=protected-access
  streaming = options is not None and options.view_as(StandardOptions).streaming
  return not streaming and pcoll.is_bounded


@dataclasses.dataclass(frozen=True)
class WindowSpec:
  """How events are windowed in event time.

  Attributes:
    kind: 'fixed' (size), 'sliding' (size, period), 'session' (gap) or
      'global' (one window for all time; use with an early trigger).
    size: window length in seconds (fixed, sliding).
    period: sliding step in seconds (sliding).
    gap: session gap in seconds: a session ends after `gap` without events.
    allowed_lateness: seconds after the end of a window during which late
      events still update it (LATE panes); later events are late data.
    early_after_secs: emit EARLY panes every this many seconds of
      processing time after the first event of a pane.
    early_after_count: emit EARLY panes every this many events.
    accumulation: 'discarding' or 'accumulating' (see module docstring).
  """

  kind: str = 'fixed'
  size: float = 60.0
  period: float | None = None
  gap: float | None = None
  allowed_lateness: float = 0.0
  early_after_secs: float | None = None
  early_after_count: int | None = None
  accumulation: str = 'discarding'

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {self.kind!r}')
    if self.kind in ('fixed', 'sliding') and not self.size > 0:
      raise ValueError(f'{self.kind} windows need size > 0, got {self.size}')
    if self.kind == 'sliding' and not (self.period and 0 < self.period <= self.size):
      raise ValueError(f'sliding windows need 0 < period <= size, got {self.period}')
    if self.kind == 'session' and not (self.gap and self.gap > 0):
      raise ValueError(f'session windows need gap > 0, got {self.gap}')
    if self.allowed_lateness < 0:
      raise ValueError('allowed_lateness must be >= 0')
    if self.early_after_secs is not None and self.early_after_count is not None:
      raise ValueError('give early_after_secs or early_after_count, not both')
    if self.accumulation not in ACCUMULATION:
      raise ValueError(f'accumulation must be one of {sorted(ACCUMULATION)}')

  def as_run_on(self, pcoll: beam.PCollection) -> WindowSpec:
    """This spec as it runs on `pcoll`: in batch without processing-time
    EARLY panes (module docstring), otherwise unchanged."""
    if self.early_after_secs is not None and is_batch(pcoll):
      return dataclasses.replace(self, early_after_secs=None)
    return self

  def window_fn(self) -> bw.WindowFn:
    if self.kind == 'fixed':
      return bw.FixedWindows(self.size)
    if self.kind == 'sliding':
      return bw.SlidingWindows(self.size, self.period)
    if self.kind == 'session':
      return bw.Sessions(self.gap)
    return bw.GlobalWindows()

  def trigger(self) -> tr.TriggerFn | None:
    """AfterWatermark with the requested early firings and a late firing per
    late element; None (Beam's default trigger) when nothing is requested."""
    early = None
    if self.early_after_secs is not None:
      early = tr.AfterProcessingTime(self.early_after_secs)
    elif self.early_after_count is not None:
      early = tr.AfterCount(self.early_after_count)
    if self.kind == 'global':
      return tr.Repeatedly(early) if early is not None else None
    if early is None and self.allowed_lateness == 0:
      return None
    late = tr.AfterCount(1) if self.allowed_lateness > 0 else None
    return tr.AfterWatermark(early=early, late=late)

  def window_into(self) -> beam.WindowInto:
    trigger = self.trigger()
    kwargs = {}
    if trigger is not None:
      kwargs = {'trigger': trigger, 'accumulation_mode': ACCUMULATION[self.accumulation]}
    return beam.WindowInto(self.window_fn(), allowed_lateness=Duration.of(self.allowed_lateness), **kwargs)

  def assign(self, timestamp: float) -> list[bw.BoundedWindow]:
    """The windows (before session merging) an event at `timestamp` falls in."""
    ts = Timestamp.of(timestamp)
    return list(self.window_fn().assign(bw.WindowFn.AssignContext(ts)))

  def expiry(self, window: bw.BoundedWindow) -> Timestamp:
    """The watermark beyond which `window` drops new data: end + lateness.

    Beam's GroupByKey ignores an element for a window once the input
    watermark is strictly greater than this.
    """
    return window.end + Duration.of(self.allowed_lateness)
