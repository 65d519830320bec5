"""Fixes for Beam SDK bugs, applied on import of beam_dl.

1. Time-based output flushing silently loses elements (below).
2. State-cache sizing walks every loaded module per call (`apply_state_cache_sizing`).
3. `AfterProcessingTime` with a fractional delay (e.g. 0.5 s): its
   `to_runner_api` writes `delay * 1000` into the int64 `delay_millis` field
   and raises (the pipeline fails to translate its WindowInto), and its
   `from_runner_api` floors the milliseconds to whole seconds (`// 1000`),
   so the Python runners would fire a 0.5 s trigger at once. The fix writes
   rounded milliseconds and reads them back as float seconds
   (`_fix_processing_time_delay`).
4. RunInference logs "Resource module is not available for current
   platform" on every platform without PyTorch: `apache_beam.ml.inference.base`
   imports `resource` in the same `try` as its torch-only `ModelManager`, so
   the torch ImportError sets `resource = None` and each memory reading
   warns and reports 0. `_fix_inference_resource_module` puts the standard
   module back (`resource_module_fixed`).

Time-based output flushing in the SDK harness (Beam 2.77,
`apache_beam.runners.worker.data_plane.TimeBasedBufferingClosableOutputStream`)
flushes a bundle's output buffer from a timer thread every
`data_buffer_time_limit_ms`, while the bundle's own thread keeps encoding
elements into the same buffer without a lock. The timer thread does
`data = get(); send(data); clear()`: every element the bundle writes while
`send` runs (it puts into a gRPC queue and releases the GIL) is cleared
without being sent -- lost, with no error. The DirectRunner's
`--direct_running_mode=multi_threading` always flushes this way (the
embedded SDK harness is started with a 1 s limit); SDK workers of the
portable runners and Dataflow do so when the `data_buffer_time_limit_ms`
experiment is set. The more threads compete for the GIL and the longer a
bundle streams output (e.g. RunInference over thousands of images), the
more elements go.

The fix keeps every write and every flush on the bundle's own thread: the
timer thread only marks a flush as due, and the next `maybe_flush()`, which
the SDK calls after writing each element (and timer), sends the buffer.
Output is still flushed at least every time limit while elements are being
written, and on close; nothing is cleared that was not sent.
"""
from __future__ import annotations

import logging

import objsize
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.worker import data_plane, statecache
from apache_beam.transforms import trigger

_log = logging.getLogger(__name__)
_STREAM = data_plane.TimeBasedBufferingClosableOutputStream


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
BEAM_METHODS = {name: _STREAM.__dict__[name] for name in ('_schedule_periodic_flush', 'maybe_flush') if name in _STREAM.__dict__}
if 'maybe_flush' not in BEAM_METHODS:
  BEAM_METHODS['maybe_flush'] = data_plane.SizeBasedBufferingClosableOutputStream.maybe_flush
FIXED_METHODS = {'_schedule_periodic_flush': _schedule_periodic_flush, 'maybe_flush': _maybe_flush}


def apply() -> bool:
  """Installs the fix once; True if installed (now or before).

  Refuses (logs, returns False) when Beam's stream class no longer has the
  shape this fix was written against, rather than patch code it does not
  know.
  """
  if getattr(_STREAM, '_beam_dl_fixed', False):
    return True
  expected = ('_schedule_periodic_flush', 'maybe_flush', 'flush', 'close')
  if not all(hasattr(_STREAM, name) for name in expected):
    _log.warning('beam_dl: %s changed; time-based flush fix not applied', _STREAM.__qualname__)
    return False
  for name, method in FIXED_METHODS.items():
    setattr(_STREAM, name, method)
  _STREAM._beam_dl_fixed = True
  return True


# State cache sizing. Every value put in (or loaded into) an SDK worker's
# state cache is weighed with `statecache.get_deep_size`, which calls
# `objsize.get_deep_size` with objsize's default `exclude_modules_globals=True`:
# on each call objsize lists `vars()` of every module in `sys.modules` (~3,000
# with JAX/TF loaded) to exclude their globals, whatever the size of the value.
# A stateful DoFn on the in-process runner (its cache is on, 100 MB) paid ~7 ms
# per state write for it (the late-data gate: 78 of 109 s for 10k events,
# benchmarks/RESULTS.md). Beam's own filter already stops the walk at modules,
# types and functions, the ways to reach module globals from a value, so the
# weight stays the same without the per-call listing.
BEAM_DEEP_SIZE = statecache.get_deep_size


def state_cache_deep_size(*objs) -> int:
  """Beam's `statecache.get_deep_size` without objsize's per-call module walk."""
  return objsize.get_deep_size(
      *objs,
      get_size_func=statecache._size_func,  # pylint: disable=protected-access
      get_referents_func=statecache._get_referents_func,  # pylint: disable=protected-access
      filter_func=statecache._filter_func,  # pylint: disable=protected-access
      exclude_modules_globals=False)


def apply_state_cache_sizing() -> bool:
  """Installs `state_cache_deep_size` as the state cache's weigher once; True
  if installed. Refuses (logs, returns False) when Beam's statecache no longer
  has the helpers it reuses."""
  if statecache.get_deep_size is state_cache_deep_size:
    return True
  if not all(hasattr(statecache, name) for name in ('_size_func', '_get_referents_func', '_filter_func')):
    _log.warning('beam_dl: apache_beam.runners.worker.statecache changed; state cache sizing fix not applied')
    return False
  statecache.get_deep_size = state_cache_deep_size
  return True


def _processing_time_to_runner_api(self, context):
  del context
  delay = beam_runner_api_pb2.TimestampTransform(
      delay=beam_runner_api_pb2.TimestampTransform.Delay(delay_millis=int(round(self.delay * 1000))))
  return beam_runner_api_pb2.Trigger(
      after_processing_time=beam_runner_api_pb2.Trigger.AfterProcessingTime(timestamp_transforms=[delay]))


def _processing_time_from_runner_api(proto, context):
  del context
  transforms = proto.after_processing_time.timestamp_transforms
  millis = transforms[0].delay.delay_millis if transforms else 0
  return trigger.AfterProcessingTime(delay=millis / 1000 if millis % 1000 else millis // 1000)


def _fix_processing_time_delay() -> bool:
  """Sub-second `AfterProcessingTime` delays survive the Runner API round trip (fix 3).

  Whole seconds still come back as ints, as Beam's own code returns them.
  """
  cls = trigger.AfterProcessingTime
  if getattr(cls, '_beam_dl_fixed', False):
    return True
  if not all(name in cls.__dict__ for name in ('to_runner_api', 'from_runner_api')):
    _log.warning('beam_dl: %s changed; fractional delay fix not applied', cls.__qualname__)
    return False
  cls.to_runner_api = _processing_time_to_runner_api
  cls.from_runner_api = staticmethod(_processing_time_from_runner_api)
  cls._beam_dl_fixed = True
  return True


def _fix_inference_resource_module() -> bool:
  """RunInference's memory readings use the `resource` module a failed torch import hid (fix 4)."""
  from apache_beam.ml.inference import base  # pylint: disable=g-import-not-at-top
  if getattr(base, 'resource', True) is not None:
    return True
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # not on this platform: Beam's warning is then right
    return False
  base.resource = resource
  return True


apply()
apply_state_cache_sizing()
_fix_processing_time_delay()
resource_module_fixed = _fix_inference_resource_module()
