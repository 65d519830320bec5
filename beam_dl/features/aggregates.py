"""Per-key, per-window summary statistics as one mergeable `beam.CombineFn`.

`WindowStatsFn` computes count, sum, mean, std, min, max, first/last event
time and last value of a stream of `(event_time, values, ...)` tuples, where
`values` is a fixed-width tuple of F floats (F >= 1). It is meant for
`beam.CombinePerKey` under any windowing (fixed, sliding, session):

* The accumulator is small and of fixed size whatever the window holds
  (count, mean, sum of squared deviations, min, max, first/last time, last
  value), so runners can lift the combiner (partial combining before the
  shuffle) and session windows can merge accumulators.
* Mean and variance use Welford's update and Chan et al.'s pairwise merge:
  numerically stable where `sum(x**2) - n*mean**2` loses digits.
* "last" is the value at the greatest event time, ties broken by the larger
  value tuple, so the result does not depend on arrival or bundle order.

`rate` needs the window length, which a CombineFn does not see; the
PTransforms in `transforms.windowing` add it as `count / window seconds`
through `features_record`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import apache_beam as beam
import numpy as np

# The feature names in a features record, in schema order (docs/streaming.md).
VECTOR_FEATURES = ('sum', 'mean', 'std', 'min', 'max', 'last')


class WindowStats:
  """Accumulator: running moments of F features plus first/last event.

  Attributes:
    count: number of events.
    mean, m2: per-feature running mean and sum of squared deviations.
    min, max: per-feature extremes.
    first_time, last_time: smallest and greatest event time (seconds).
    last: the values at `last_time`.
  """

  __slots__ = ('count', 'mean', 'm2', 'min', 'max', 'first_time', 'last_time', 'last')

  def __init__(self):
    self.count = 0
    self.mean: list[float] = []
    self.m2: list[float] = []
    self.min: list[float] = []
    self.max: list[float] = []
    self.first_time = math.inf
    self.last_time = -math.inf
    self.last: tuple[float, ...] = ()

  def __getstate__(self):
    return tuple(getattr(self, s) for s in self.__slots__)

  def __setstate__(self, state):
    for slot, value in zip(self.__slots__, state):
      setattr(self, slot, value)

  def __repr__(self):
    return f'WindowStats(count={self.count}, mean={self.mean}, last_time={self.last_time})'

  def add(self, time: float, values: Sequence[float]) -> 'WindowStats':
    """Adds one event in place (Welford); returns self."""
    if self.count == 0:
      width = len(values)
      if width == 0:
        raise ValueError('an event needs at least one value')
      self.count = 1
      self.mean = [float(v) for v in values]
      self.m2 = [0.0] * width
      self.min = list(self.mean)
      self.max = list(self.mean)
      self.first_time = self.last_time = float(time)
      self.last = tuple(self.mean)
      return self
    if len(values) != len(self.mean):
      raise ValueError(f'event has {len(values)} values, window has {len(self.mean)}')
    self.count += 1
    n = self.count
    mean, m2, lo, hi = self.mean, self.m2, self.min, self.max
    for i, v in enumerate(values):
      v = float(v)
      delta = v - mean[i]
      mean[i] += delta / n
      m2[i] += delta * (v - mean[i])
      if v < lo[i]:
        lo[i] = v
      if v > hi[i]:
        hi[i] = v
    time = float(time)
    if time < self.first_time:
      self.first_time = time
    if time > self.last_time or (time == self.last_time and tuple(values) > self.last):
      self.last_time = time
      self.last = tuple(float(v) for v in values)
    return self

  def merge(self, other: 'WindowStats') -> 'WindowStats':
    """Merges `other` into self in place (Chan et al.); returns self."""
    if other.count == 0:
      return self
    if self.count == 0:
      self.__setstate__(other.__getstate__())
      self.mean, self.m2 = list(other.mean), list(other.m2)
      self.min, self.max = list(other.min), list(other.max)
      return self
    if len(other.mean) != len(self.mean):
      raise ValueError(f'cannot merge windows of {len(self.mean)} and {len(other.mean)} values')
    n_a, n_b = self.count, other.count
    n = n_a + n_b
    for i in range(len(self.mean)):
      delta = other.mean[i] - self.mean[i]
      self.mean[i] += delta * n_b / n
      self.m2[i] += other.m2[i] + delta * delta * n_a * n_b / n
      self.min[i] = min(self.min[i], other.min[i])
      self.max[i] = max(self.max[i], other.max[i])
    self.count = n
    self.first_time = min(self.first_time, other.first_time)
    if (other.last_time, other.last) > (self.last_time, self.last):
      self.last_time, self.last = other.last_time, other.last
    return self

  def features(self) -> dict:
    """The statistics as a JSON-friendly dict (population std, ddof=0)."""
    if self.count == 0:
      return {'count': 0}
    n = self.count
    return {
      'count': n,
      'sum': [m * n for m in self.mean],
      'mean': list(self.mean),
      'std': [math.sqrt(max(m2, 0.0) / n) for m2 in self.m2],
      'min': list(self.min),
      'max': list(self.max),
      'last': list(self.last),
      'first_time': self.first_time,
      'last_time': self.last_time,
    }


class WindowStatsFn(beam.CombineFn):
  """`(event_time, values)` -> features dict; see the module docstring.

  Output: {"count", "sum", "mean", "std", "min", "max", "last" (lists of F
  floats), "first_time", "last_time" (seconds)}; `rate` is added by
  `features_record` once the window is known.
  """

  def create_accumulator(self) -> WindowStats:
    return WindowStats()

  def add_input(self, accumulator: WindowStats, element) -> WindowStats:
    return accumulator.add(element[0], element[1])

  def add_inputs(self, accumulator: WindowStats, elements: Iterable) -> WindowStats:
    """Many events at once: one vectorised pass, then a pairwise merge."""
    elements = list(elements)
    if len(elements) < 32:
      for element in elements:
        accumulator.add(element[0], element[1])
      return accumulator
    return accumulator.merge(
      stats_of_arrays(np.array([e[0] for e in elements], np.float64), np.array([e[1] for e in elements], np.float64))
    )

  def merge_accumulators(self, accumulators: Iterable[WindowStats]) -> WindowStats:
    accumulators = iter(accumulators)
    merged = next(accumulators, None) or WindowStats()
    for acc in accumulators:
      merged.merge(acc)
    return merged

  def extract_output(self, accumulator: WindowStats) -> dict:
    return accumulator.features()


def stats_of_arrays(times: np.ndarray, values: np.ndarray) -> WindowStats:
  """A `WindowStats` for many events given as arrays ([N] times, [N, F] values)."""
  values = np.asarray(values, np.float64)
  if values.ndim == 1:
    values = values[:, None]
  stats = WindowStats()
  if len(values) == 0:
    return stats
  order = np.lexsort(tuple(values[:, ::-1].T) + (times,))  # by time, then values
  last = order[-1]
  mean = values.mean(axis=0)
  stats.count = len(values)
  stats.mean = mean.tolist()
  stats.m2 = ((values - mean) ** 2).sum(axis=0).tolist()
  stats.min = values.min(axis=0).tolist()
  stats.max = values.max(axis=0).tolist()
  stats.first_time = float(times.min())
  stats.last_time = float(times[last])
  stats.last = tuple(values[last].tolist())
  return stats


def features_record(
  key: str, window_start: float, window_end: float, features: dict, pane: str = 'UNKNOWN', pane_index: int = 0
) -> dict:
  """One output record: key, window bounds, pane, features and `rate`.

  `rate` is events per second of window length, `count / (end - start)`.
  """
  length = window_end - window_start
  record = {
    'key': key,
    'window_start': window_start,
    'window_end': window_end,
    'pane': pane,
    'pane_index': pane_index,
  }
  record.update(features)
  record['rate'] = features.get('count', 0) / length if length > 0 else float('nan')
  return record
