"""The SDK harness's time-based output flush loses elements (Beam 2.77).

`apache_beam.runners.worker.data_plane.TimeBasedBufferingClosableOutputStream`
flushes a bundle's output buffer from a timer thread every
`data_buffer_time_limit_ms`, while the bundle's own thread keeps encoding
elements into the same buffer without a lock. The timer thread does
`data = get(); send(data); clear()`: every element the bundle writes while
`send` runs (it puts into a gRPC queue and releases the GIL) is cleared
without being sent: lost, with no error. The DirectRunner's
`--direct_running_mode=multi_threading` always flushes this way (its
embedded SDK harness starts with a 1 s limit); SDK workers of the portable
runners and Dataflow do when the `data_buffer_time_limit_ms` experiment is
set. The more threads compete for the GIL and the longer a bundle streams
output, the more elements go.

The fix keeps every write and every flush on the bundle's own thread: the
timer thread only marks a flush as due, and the next `maybe_flush()`, which
the SDK calls after writing each element (and timer), sends the buffer.
Output is still flushed at least every time limit while elements are being
written, and on close; nothing is cleared that was not sent.
"""

from __future__ import annotations

from apache_beam.runners.worker import data_plane

from beam_dl.beam_fixes import BeamFix

STREAM = data_plane.TimeBasedBufferingClosableOutputStream


def _schedule_periodic_flush(self) -> None:
  """Timer thread: mark a flush as due; never touch the buffer."""
  self._flush_due = False

  def mark_due():
    self._flush_due = True

  self._periodic_flusher = data_plane.PeriodicThread(self._time_flush_threshold_ms / 1000.0, mark_due)
  self._periodic_flusher.daemon = True
  self._periodic_flusher.start()


def _maybe_flush(self) -> None:
  """Writer thread, after each element: flush when big enough or when due."""
  if self._flush_due or self.size() > self._size_flush_threshold:
    self._flush_due = False
    self.flush()


# Beam's own methods, and the fixed ones (tests run the stream with each).
BEAM_METHODS = {
  name: STREAM.__dict__[name] for name in ('_schedule_periodic_flush', 'maybe_flush') if name in STREAM.__dict__
}
if 'maybe_flush' not in BEAM_METHODS:
  BEAM_METHODS['maybe_flush'] = data_plane.SizeBasedBufferingClosableOutputStream.maybe_flush
FIXED_METHODS = {'_schedule_periodic_flush': _schedule_periodic_flush, 'maybe_flush': _maybe_flush}
_MISSING = object()
_BEAM_DICT = {name: STREAM.__dict__.get(name, _MISSING) for name in FIXED_METHODS}


def apply() -> bool:
  """Installs the fix; False (Beam untouched) if the stream class no longer
  has the methods it replaces."""
  if STREAM.__dict__.get('_beam_dl_fixed'):
    return True
  if not all(hasattr(STREAM, name) for name in ('_schedule_periodic_flush', 'maybe_flush', 'flush', 'close')):
    return False
  for name, method in FIXED_METHODS.items():
    setattr(STREAM, name, method)
  STREAM._beam_dl_fixed = True
  return True


def revert() -> None:
  """Puts Beam's own methods back."""
  for name in FIXED_METHODS:
    if _BEAM_DICT[name] is _MISSING:
      STREAM.__dict__.get(name) and delattr(STREAM, name)
    else:
      setattr(STREAM, name, _BEAM_DICT[name])
  STREAM._beam_dl_fixed = False


FIX = BeamFix('output_flush', 'time-based output flush loses elements written during it', '>=2.77,<2.78', apply, revert)
