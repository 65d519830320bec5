"""Data drift: reference profiles, mergeable histograms, PSI and Jensen-Shannon.

The plain functions behind `transforms.drift.ComputeDrift` (no Beam here):

- A `DriftProfile` holds, per feature, the interior bin edges and the
  reference probability of each bin. Bins come from the training data's
  quantiles (`build_profile`), so every reference bin holds about the same
  mass, or from the statistics that `pipelines.preprocess` writes to
  `stats.json` (`profile_from_stats`). Features with few distinct values (a
  predicted class) get one bin per value. It is saved as JSON, by convention
  `drift_profile.json` beside the model directory.
- `Histograms` counts serving values into the profile's bins. Counts add, so
  two histograms merge by addition: one accumulator serves a whole batch, a
  sliding window, or the partial results of many workers (a CombineFn).
  Values are buffered and binned with numpy in chunks, not one by one.
- `image_statistics` is the one definition of an image's input features
  (brightness and contrast on the 0..255 pixel scale), used by serving and
  by training, which saves a profile of its own inputs in the model
  directory (`input_profile`), so a model is served against the data it
  was trained on by default.
- `sequence_input_profile` does the same for sequence models: one feature
  per input channel, `input/<i>` (the raw value of channel i at every
  step). Serving builds channel i from its i-th value field, so
  `fields_profile` renames `input/<i>` to that field's name.
- `compare` turns a window's histograms into per-feature PSI and
  Jensen-Shannon distance, and a level by the usual PSI conventions
  (< 0.1 stable, 0.1-0.25 moderate, >= 0.25 significant; configurable).

Every histogram has one extra bin after the value bins, for values that are
missing or not finite, so a feature that starts arriving empty drifts too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

# scipy is imported where it is used: every scoring pipeline imports this
# module, and importing scipy.stats costs ~0.9 CPU s per run (a twentieth
# of the flagship benchmark's 24,000 images) even when drift is off.

PROFILE_FILE = 'drift_profile.json'
PREDICTION_PREFIX = 'prediction/'
DEFAULT_BINS = 10
# Probability floor for empty bins: PSI and KL are infinite on a bin that is
# empty on one side only; the usual remedy is a small floor, then renormalise.
EPSILON = 1e-4
WARN_PSI = 0.1
ALERT_PSI = 0.25
_FLUSH_EVERY = 4096


@dataclasses.dataclass(frozen=True)
class FeatureProfile:
  """One feature's reference distribution over fixed bins.

  `edges` are the interior bin boundaries, sorted: value bin i holds
  edges[i-1] < x <= edges[i] (numpy `searchsorted(side='left')`), with open
  ends. `probabilities` has len(edges) + 2 entries: the value bins, then one
  bin for missing or non-finite values.
  """

  edges: tuple[float, ...]
  probabilities: tuple[float, ...]
  count: int = 0

  def __post_init__(self):
    if len(self.probabilities) != len(self.edges) + 2:
      raise ValueError(
        f'{len(self.edges)} edges need {len(self.edges) + 2} probabilities '
        f'(value bins + missing), got {len(self.probabilities)}'
      )
    if list(self.edges) != sorted(self.edges):
      raise ValueError(f'bin edges must be sorted: {self.edges}')

  @property
  def num_bins(self) -> int:
    return len(self.probabilities)


@dataclasses.dataclass(frozen=True)
class DriftProfile:
  """Reference distributions of named features (inputs and `prediction/...`)."""

  features: Mapping[str, FeatureProfile]
  source: str = ''

  def to_json(self) -> dict:
    return {
      'source': self.source,
      'features': {
        name: {'edges': list(f.edges), 'probabilities': list(f.probabilities), 'count': f.count}
        for name, f in sorted(self.features.items())
      },
    }

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'DriftProfile':
    features = {
      name: FeatureProfile(
        tuple(float(e) for e in f['edges']), tuple(float(p) for p in f['probabilities']), int(f.get('count', 0))
      )
      for name, f in data['features'].items()
    }
    if not features:
      raise ValueError('a drift profile needs at least one feature')
    return cls(features, data.get('source', ''))


def save_profile(profile: DriftProfile, path: str) -> str:
  """Writes the profile as JSON (any Beam filesystem path); returns the path."""
  from apache_beam.io.filesystems import FileSystems

  with FileSystems.create(path) as f:
    f.write(json.dumps(profile.to_json(), indent=2).encode('utf-8'))
  return path


def load_profile(path: str) -> DriftProfile:
  """A profile written by `save_profile`; a directory means its drift_profile.json."""
  from apache_beam.io.filesystems import FileSystems

  if not path.endswith('.json'):
    path = os.path.join(path, PROFILE_FILE)
  with FileSystems.open(path) as f:
    return DriftProfile.from_json(json.loads(f.read().decode('utf-8')))


# -- building reference profiles ---------------------------------------------------


def bin_edges(values: np.ndarray, num_bins: int = DEFAULT_BINS) -> np.ndarray:
  """Interior edges: reference quantiles, or midpoints when few distinct values.

  A feature with at most `num_bins` distinct values (a class id, a flag) gets
  one bin per value, so a shift between classes is seen exactly; otherwise
  the edges are the 1/n .. (n-1)/n quantiles (ties merged).
  """
  finite = values[np.isfinite(values)]
  if finite.size == 0:
    return np.zeros(0)
  distinct = np.unique(finite)
  if distinct.size <= num_bins:
    return (distinct[:-1] + distinct[1:]) / 2
  return np.unique(np.quantile(finite, np.linspace(0, 1, num_bins + 1)[1:-1]))


def bin_counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Counts of `values` per bin of `edges` (+ the missing bin), int64."""
  values = np.asarray(values, np.float64).reshape(-1)
  finite = np.isfinite(values)
  index = np.where(finite, np.searchsorted(edges, np.where(finite, values, 0.0), side='left'), len(edges) + 1)
  return np.bincount(index, minlength=len(edges) + 2).astype(np.int64)


def feature_profile(values, num_bins: int = DEFAULT_BINS) -> FeatureProfile:
  """The reference profile of one feature's training values."""
  values = np.asarray(values, np.float64).reshape(-1)
  edges = bin_edges(values, num_bins)
  counts = bin_counts(edges, values)
  total = max(int(counts.sum()), 1)
  return FeatureProfile(tuple(float(e) for e in edges), tuple(float(c) / total for c in counts), int(counts.sum()))


def build_profile(columns: Mapping[str, Any], num_bins: int = DEFAULT_BINS, source: str = '') -> DriftProfile:
  """{feature: values} from training (or reference) data -> DriftProfile."""
  return DriftProfile({name: feature_profile(values, num_bins) for name, values in columns.items()}, source)


IMAGE_FEATURES = ('image/brightness', 'image/contrast')


def image_statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
  """Images [..., H, W, C] (raw pixel values, before the model's input
  scaling) -> {"image/brightness", "image/contrast"}: mean and standard
  deviation over each image, divided by 255. A uint8 image gives 0..1; data
  on another scale (pixels 0..16, or already scaled to 0..1) lands far from
  it, which is what a reference profile should notice."""
  pixels = np.asarray(pixels, np.float32)
  axes = tuple(range(pixels.ndim - 3, pixels.ndim))
  return {'image/brightness': pixels.mean(axis=axes) / 255.0, 'image/contrast': pixels.std(axis=axes) / 255.0}


def input_profile(batches: Iterable[np.ndarray], num_bins: int = DEFAULT_BINS, source: str = '') -> DriftProfile:
  """The profile of image inputs (batches [B, H, W, C], raw values) by `image_statistics`."""
  columns: dict[str, list[float]] = {name: [] for name in IMAGE_FEATURES}
  for batch in batches:
    for name, values in image_statistics(batch).items():
      columns[name].extend(np.asarray(values, np.float64).reshape(-1).tolist())
  return build_profile(columns, num_bins, source)


SEQUENCE_INPUT_PREFIX = 'input/'


def sequence_input_name(channel: int) -> str:
  """The profile name of a sequence model's input channel: `input/<channel>`."""
  return f'{SEQUENCE_INPUT_PREFIX}{channel}'


def sequence_input_profile(batches: Iterable[tuple], num_bins: int = DEFAULT_BINS, source: str = '') -> DriftProfile:
  """The profile of sequence inputs: batches of (x [B, T, F], mask [B, T]),
  raw values (before the model's `input_scale`) -> one feature per channel,
  `input/<i>` over the values of every real step (padding, mask False, left
  out). SequenceExamples carry no channel names, hence the index; serving's
  channel i is its i-th `--event_value_fields` field (`fields_profile`)."""
  columns: dict[int, list[np.ndarray]] = {}
  for x, mask in batches:
    steps = np.asarray(x, np.float64)[np.asarray(mask, bool)]  # [steps, F]
    for channel in range(steps.shape[-1]):
      columns.setdefault(channel, []).append(steps[:, channel])
  return build_profile(
    {sequence_input_name(c): np.concatenate(v) for c, v in sorted(columns.items())}, num_bins, source
  )


def fields_profile(profile: DriftProfile, fields: Iterable[str]) -> DriftProfile | None:
  """A sequence input profile with `input/<i>` renamed to `fields[i]`, the
  name serving gives channel i; None when it has none of those channels."""
  features = {
    field: profile.features[sequence_input_name(i)]
    for i, field in enumerate(fields)
    if sequence_input_name(i) in profile.features
  }
  return DriftProfile(features, profile.source) if features else None


def columns_of(records: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
  """Feature records ({name: number or list of numbers}) -> {name: all values}."""
  columns: dict[str, list[float]] = {}
  for record in records:
    for name, value in record.items():
      column = columns.setdefault(name, [])
      if isinstance(value, (list, tuple, np.ndarray)):
        column.extend(_as_float(v) for v in np.asarray(value).reshape(-1))
      else:
        column.append(_as_float(value))
  return columns


def profile_from_stats(stats: Mapping[str, list[float]], num_bins: int = DEFAULT_BINS) -> DriftProfile:
  """A profile from tf.Transform's `stats.json` (`beam_dl.preprocessing.stats`).

  `<name>/boundaries` (tft.quantiles) become that feature's edges with equal
  reference mass per bucket, which is what quantile boundaries mean.
  `<name>/mean` + `<name>/var` become `num_bins` equal-mass bins of the
  normal distribution with that mean and variance: an approximation, for
  when no sample of the training data is at hand (a quantile profile from
  `build_profile` is exact).
  """
  features = {}
  for key, value in stats.items():
    name, _, stat = key.rpartition('/')
    if stat == 'boundaries':
      edges = np.unique(np.asarray(value, np.float64))
      features[name] = _equal_mass(edges)
    elif stat == 'mean' and f'{name}/var' in stats and name not in features:
      mean, var = float(np.mean(value)), float(np.mean(stats[f'{name}/var']))
      if var > 0:
        from scipy.stats import norm  # pylint: disable=import-outside-toplevel  # see the imports

        edges = mean + math.sqrt(var) * norm.ppf(np.linspace(0, 1, num_bins + 1)[1:-1])
        features[name] = _equal_mass(edges)
  if not features:
    raise ValueError(f'no <name>/boundaries or <name>/mean + /var statistics in {sorted(stats)}')
  return DriftProfile(features, 'stats.json')


def _equal_mass(edges: np.ndarray) -> FeatureProfile:
  probs = [1.0 / (len(edges) + 1)] * (len(edges) + 1) + [0.0]
  return FeatureProfile(tuple(float(e) for e in edges), tuple(probs))


def _as_float(value) -> float:
  try:
    return float(value) if value is not None else math.nan
  except (TypeError, ValueError):
    return math.nan


# -- serving histograms ----------------------------------------------------------


class Histograms:
  """Per-feature bin counts of serving data in a profile's bins; mergeable.

  `add` buffers values and bins them in numpy chunks; `merge` adds counts.
  Features not in the profile are ignored (counted in `ignored`).
  """

  def __init__(self, profile: DriftProfile):
    self._profile = profile
    self._edges = {name: np.asarray(f.edges, np.float64) for name, f in profile.features.items()}
    self.counts = {name: np.zeros(f.num_bins, np.int64) for name, f in profile.features.items()}
    self._pending: dict[str, list[float]] = {name: [] for name in profile.features}
    self._num_pending = 0
    self.ignored = 0

  def add(self, record: Mapping[str, Any]) -> 'Histograms':
    for name, value in record.items():
      pending = self._pending.get(name)
      if pending is None:
        self.ignored += 1
      elif isinstance(value, (list, tuple, np.ndarray)):
        values = [_as_float(v) for v in np.asarray(value).reshape(-1)]
        pending.extend(values)
        self._num_pending += len(values)
      else:
        pending.append(_as_float(value))
        self._num_pending += 1
    if self._num_pending >= _FLUSH_EVERY:
      self.flush()
    return self

  def flush(self) -> 'Histograms':
    for name, pending in self._pending.items():
      if pending:
        self.counts[name] += bin_counts(self._edges[name], pending)
        pending.clear()
    self._num_pending = 0
    return self

  def merge(self, other: 'Histograms') -> 'Histograms':
    self.flush()
    other.flush()
    for name, counts in other.counts.items():
      self.counts[name] += counts
    self.ignored += other.ignored
    return self


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = EPSILON) -> float:
  """Population Stability Index: sum (a - e) ln(a / e) = KL(a||e) + KL(e||a)."""
  from scipy.special import rel_entr  # pylint: disable=import-outside-toplevel  # see the imports

  e, a = _floored(expected, epsilon), _floored(actual, epsilon)
  return float(np.sum(rel_entr(a, e) + rel_entr(e, a)))


def js_distance(expected: np.ndarray, actual: np.ndarray) -> float:
  """Jensen-Shannon distance, base 2: 0 (same) .. 1 (disjoint); finite on empty bins."""
  from scipy.spatial.distance import jensenshannon  # pylint: disable=import-outside-toplevel  # see the imports

  return float(jensenshannon(np.asarray(expected, np.float64), np.asarray(actual, np.float64), base=2))


def _floored(probabilities, epsilon: float) -> np.ndarray:
  p = np.maximum(np.asarray(probabilities, np.float64), epsilon)
  return p / p.sum()


def level(value: float, warn: float = WARN_PSI, alert: float = ALERT_PSI) -> str:
  """'stable' (< warn), 'moderate' (< alert) or 'significant' by PSI convention."""
  if value >= alert:
    return 'significant'
  return 'moderate' if value >= warn else 'stable'


def compare(
  profile: DriftProfile, histograms: Histograms, warn: float = WARN_PSI, alert: float = ALERT_PSI, min_count: int = 1
) -> dict[str, dict]:
  """{feature: {"count", "psi", "js", "level"}} for features with >= min_count values.

  Counts are proportions before comparison; a feature seen fewer than
  `min_count` times in the window is left out (too few to judge).
  """
  histograms.flush()
  report = {}
  for name, counts in sorted(histograms.counts.items()):
    total = int(counts.sum())
    if total < max(min_count, 1):
      continue
    expected = np.asarray(profile.features[name].probabilities, np.float64)
    actual = counts / total
    value = psi(expected, actual)
    report[name] = {
      'count': total,
      'psi': round(value, 6),
      'js': round(js_distance(expected, actual), 6),
      'level': level(value, warn, alert),
    }
  return report
