"""Progress lines with rate and ETA for long loops (training, benchmarks)."""

from __future__ import annotations

import logging
import time
from typing import Callable

_log = logging.getLogger('beam_dl')


class Progress:
  """Logs `done/total`, items per second and ETA every `every` seconds.

  A `total` of None (or 0) is unknown: lines say `done` and the rate, no ETA,
  and nothing counts as finished, so lines still come every `every` seconds.
  `clock` is injectable so tests can drive time.
  """

  def __init__(
    self,
    total: int | None,
    *,
    name: str = 'progress',
    unit: str = 'steps',
    every_secs: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
  ):
    self._total = total or None
    self._name = name
    self._unit = unit
    self._every = every_secs
    self._clock = clock
    self._log = log or _log.info
    self._start = clock()
    self._last = float('-inf')
    self._first: tuple[float, int] | None = None  # (time, done) at the first update
    self.done = 0

  def update(self, n: int = 1, **extra) -> None:
    self.done += n
    now = self._clock()
    if self._first is None:
      self._first = (now, self.done)
    if now - self._last >= self._every or self.finished:
      self._last = now
      self._log(self.line(now, **extra))

  def line(self, now: float | None = None, **extra) -> str:
    """'name: done/total unit, rate unit/s, eta Ns'. Rate and ETA count from
    the first update on: the first step (a JIT compile, a pipeline start)
    says nothing about the rest, so until a second one there is no ETA."""
    now = self._clock() if now is None else now
    fields = ''.join(f' {k}={v:.4g}' if isinstance(v, float) else f' {k}={v}' for k, v in extra.items())
    first_time, first_done = self._first if self._first is not None else (self._start, 0)
    steps = self.done - first_done
    if steps <= 0 or self.finished:
      rate = self.done / max(now - self._start, 1e-9)
      eta = '0s' if self.finished else '?'
    else:
      rate = steps / max(now - first_time, 1e-9)
      eta = f'{(self._total - self.done) / rate:.0f}s' if self._total else None
    if self._total is None:
      return f'{self._name}: {self.done} {self._unit} {rate:.1f} {self._unit}/s{fields}'
    return f'{self._name}: {self.done}/{self._total} {self._unit} {rate:.1f} {self._unit}/s eta {eta}{fields}'

  @property
  def finished(self) -> bool:
    """Whether a known total has been reached (never, for an unknown total)."""
    return self._total is not None and self.done >= self._total

  @property
  def rate(self) -> float:
    return self.done / max(self._clock() - self._start, 1e-9)


class CountProgressFn:
  """A pass-through `beam.Map` callable that logs how many elements this
  process has seen and at what rate, every `every_secs` (to stderr, which
  the local runner shows), so a long local run says how far it is.

  Beam gives each thread its own copy of a step's callable, so the count
  needs no lock; with several workers each logs its own count (tagged with
  its pid).
  """

  def __init__(self, name: str, every_secs: float, total: int | None = None):
    self._name, self._every, self._total = name, every_secs, total
    self._progress = None

  def __call__(self, element):
    if self._progress is None:
      import os
      import sys

      name = f'{self._name}[pid {os.getpid()}]'
      self._progress = Progress(
        self._total,
        name=name,
        unit='elements',
        every_secs=self._every,
        log=lambda line: print(line, file=sys.stderr, flush=True),
      )
    self._progress.update()
    return element

  def __getstate__(self):
    return {'_name': self._name, '_every': self._every, '_total': self._total, '_progress': None}
