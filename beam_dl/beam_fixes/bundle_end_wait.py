"""Every bundle's end waits for the state sampler's sleep to run out, up to 200 ms (Beam 2.77).

Each bundle an SDK worker processes starts a `StateSampler` thread (it
times the steps: the `msecs` counters) that sleeps between samples, 2 ms at
first and 1.2x longer each time up to `DEFAULT_SAMPLING_PERIOD_MS` (200 ms).
The bundle ends with `StateSampler.stop`, which joins that thread: it waits
out whatever is left of the current sleep, which by then is ~1/6 of the
bundle's own duration, and up to 200 ms. The runner's task waits for the
bundle, so every stage pays it on every bundle: on Flink at 1,000 events/s
(one model stage, one task per subtask) it was 19% of the stage's wall time
(py-spy). The wait is the sampler's period, not work.

The fix caps the period at `SAMPLING_PERIOD_MS` (10 ms): a bundle's end
waits 10 ms at most (~5 ms on average), and the step timings are sampled
more often, not less.
"""

from __future__ import annotations

from apache_beam.runners.worker import statesampler

from beam_dl.beam_fixes import BeamFix

SAMPLING_PERIOD_MS = 10
BEAM_DEFAULTS = statesampler.StateSampler.__init__.__defaults__


def apply() -> bool:
  """Makes `SAMPLING_PERIOD_MS` the sampler's default period; False (Beam untouched) if its signature changed."""
  init = statesampler.StateSampler.__init__
  if init.__defaults__ == (SAMPLING_PERIOD_MS,):
    return True
  if init.__code__.co_varnames[:4] != (
    'self',
    'prefix',
    'counter_factory',
    'sampling_period_ms',
  ) or init.__defaults__ != (statesampler.DEFAULT_SAMPLING_PERIOD_MS,):
    return False
  init.__defaults__ = (SAMPLING_PERIOD_MS,)
  return True


def revert() -> None:
  statesampler.StateSampler.__init__.__defaults__ = BEAM_DEFAULTS


FIX = BeamFix(
  'bundle_end_wait',
  "each bundle's end waits out the state sampler's sleep (up to 200 ms)",
  '>=2.77,<2.78',
  apply,
  revert,
)
