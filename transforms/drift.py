"""Data drift in a pipeline: compare serving features with a reference profile.

  ComputeDrift(profile)        feature dicts -> per-window drift reports, plus alerts
  BuildDriftProfile(path)      feature dicts -> a reference profile written to `path`
  attach_drift(options, ...)   the --drift_profile / --write_drift_profile wiring of a pipeline
  CheckAgainstTraining(...)    images or events -> a drift report against the profile training
                               saved in the model directory: a metric and one warning line when
                               drifted (the default check of classify_images and score_sequences)

A feature dict is {name: number or list of numbers}: input features (an
image's brightness, an event's value fields) and `prediction/...` fields of
the model's outputs, in any mix; a name the profile lacks is ignored. The
maths lives in `beam_dl.operations.drift`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, NamedTuple, Optional, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from beam_dl.core.deadletter import side_output
from beam_dl.core.element_types import DecodedImage, EncodedImage, Record
from beam_dl.formats.events import Event
from beam_dl.operations import drift
from beam_dl.operations.metrics_export import labelled

NAMESPACE = 'beam_dl.drift'
OFF = 'none'  # --drift_profile none: no drift check, not even the default one
TRAINING_SAMPLE = 256  # images the default check decodes once more, whatever the input's size
_log = logging.getLogger('beam_dl')
DRIFT, ALERTS = 'drift', 'alerts'  # side outputs <output>_drift-*, <output>_alerts-*
FeatureDict = Mapping[str, Any]


class DriftOutputs(NamedTuple):
  reports: beam.PCollection
  alerts: beam.PCollection


class HistogramsCombineFn(beam.CombineFn):
  """Feature dicts -> `beam_dl.operations.drift.Histograms` in the profile's bins.

  Accumulators are counts, so partial results of bundles, workers and the
  panes of a sliding window merge by addition.
  """

  def __init__(self, profile: drift.DriftProfile):
    self._profile = profile

  def create_accumulator(self):
    return drift.Histograms(self._profile)

  def add_input(self, accumulator, record):
    return accumulator.add(record)

  def merge_accumulators(self, accumulators):
    accumulators = iter(accumulators)
    merged = next(accumulators)
    for other in accumulators:
      merged.merge(other)
    return merged

  def compact(self, accumulator):
    return accumulator.flush()

  def extract_output(self, accumulator):
    return accumulator.flush()


class _DriftReportFn(beam.DoFn):
  """A window's histograms -> one report record, and an alert per drifted feature.

  Sets the gauges `psi_e6{feature=...}` / `js_e6{feature=...}` (millionths;
  Beam gauges hold integers) and counts alerts per feature, for Prometheus.
  """

  def __init__(self, profile: drift.DriftProfile, warn: float, alert: float, min_count: int):
    self._profile, self._warn, self._alert, self._min_count = profile, warn, alert, min_count
    self._reports = Metrics.counter(NAMESPACE, 'reports')

  def process(self, histograms, window=beam.DoFn.WindowParam):
    features = drift.compare(self._profile, histograms, self._warn, self._alert, self._min_count)
    bounds = _window_bounds(window)
    for name, values in features.items():
      Metrics.gauge(NAMESPACE, labelled('psi_e6', feature=name)).set(int(round(values['psi'] * 1e6)))
      Metrics.gauge(NAMESPACE, labelled('js_e6', feature=name)).set(int(round(values['js'] * 1e6)))
    self._reports.inc()
    drifted = sorted(name for name, values in features.items() if values['psi'] >= self._alert)
    yield {
      **bounds,
      'features': features,
      'drifted': drifted,
      'max_psi': max((v['psi'] for v in features.values()), default=0.0),
    }
    for name in drifted:
      Metrics.counter(NAMESPACE, labelled('alerts', feature=name)).inc()
      yield beam.pvalue.TaggedOutput(ALERTS, {**bounds, 'feature': name, **features[name], 'threshold': self._alert})


def _window_bounds(window) -> dict:
  if isinstance(window, beam.window.IntervalWindow):
    return {'window_start': float(window.start), 'window_end': float(window.end)}
  return {'window_start': None, 'window_end': None}


@beam.typehints.with_input_types(Record)
class ComputeDrift(beam.PTransform):
  """Feature dicts -> drift reports per window, and alerts.

  Reports: {"window_start", "window_end", "features": {name: {"count",
  "psi", "js", "level"}}, "drifted": [names], "max_psi"}. Alerts: one
  {"window_start", "window_end", "feature", "count", "psi", "js", "level",
  "threshold"} per feature whose PSI >= `alert_psi`.

  The same steps serve batch and streaming: with `window_size` the features
  go into sliding (or, without `window_period`, fixed) event-time windows;
  without, the input's windowing is kept (a batch run is one global window).
  A window's histograms are combined from mergeable partial counts, so the
  numbers do not depend on bundling or on the runner.

  Args:
    profile: a DriftProfile, or the path of one (`beam_dl.operations.drift.load_profile`).
    window_size, window_period: seconds of event time.
    warn_psi, alert_psi: the PSI conventions (0.1 moderate, 0.25 significant).
    min_count: features with fewer values in a window are not judged.
  """

  def __init__(
    self,
    profile: drift.DriftProfile | str,
    window_size: Optional[float] = None,
    window_period: Optional[float] = None,
    warn_psi: float = drift.WARN_PSI,
    alert_psi: float = drift.ALERT_PSI,
    min_count: int = 1,
  ):
    super().__init__()
    self._profile = drift.load_profile(profile) if isinstance(profile, str) else profile
    if window_period is not None and window_size is None:
      raise ValueError('window_period needs window_size')
    if not 0 <= warn_psi <= alert_psi:
      raise ValueError(f'need 0 <= warn_psi <= alert_psi, got {warn_psi}, {alert_psi}')
    self._size, self._period = window_size, window_period
    self._warn, self._alert, self._min_count = warn_psi, alert_psi, min_count

  def expand(self, features):
    if self._size is not None:
      windows = (
        beam.window.SlidingWindows(self._size, self._period) if self._period else beam.window.FixedWindows(self._size)
      )
      features = features | 'DriftWindows' >> beam.WindowInto(windows)
    histograms = features | 'Histograms' >> beam.CombineGlobally(HistogramsCombineFn(self._profile)).without_defaults()
    out = histograms | 'Compare' >> beam.ParDo(
      _DriftReportFn(self._profile, self._warn, self._alert, self._min_count)
    ).with_output_types(Record, **{ALERTS: Record}).with_outputs(ALERTS, main='reports')
    return DriftOutputs(out.reports, out[ALERTS])


@beam.typehints.with_input_types(Record)
@beam.typehints.with_output_types(str)
class BuildDriftProfile(beam.PTransform):
  """Feature dicts of reference data -> a DriftProfile saved at `path`.

  Quantile bins from a uniform sample of at most `sample_size` values per
  feature (Beam's reservoir `Sample.FixedSizeGlobally`), so memory stays
  bounded on a large reference set. Returns the PCollection of the path.
  """

  def __init__(self, path: str, num_bins: int = drift.DEFAULT_BINS, sample_size: int = 100_000, source: str = ''):
    super().__init__()
    self._path, self._bins, self._sample, self._source = path, num_bins, sample_size, source

  def expand(self, features):
    sample = (
      features
      | 'GlobalWindow' >> beam.WindowInto(beam.window.GlobalWindows())
      | 'FeatureValues' >> beam.FlatMap(_feature_values)
      | 'SamplePerFeature' >> beam.combiners.Sample.FixedSizePerKey(self._sample)
    )
    return (
      sample
      | 'AllFeatures' >> beam.combiners.ToDict()
      | 'WriteProfile' >> beam.Map(_write_profile, self._path, self._bins, self._source)
    )


def _feature_values(record: FeatureDict):
  for name, value in record.items():
    for v in np.asarray(value, np.float64).reshape(-1):
      yield name, float(v)


def _write_profile(columns: dict, path: str, num_bins: int, source: str) -> str:
  return drift.save_profile(drift.build_profile(columns, num_bins, source), path)


# -- pipeline wiring ------------------------------------------------------------------


def drift_enabled(options) -> bool:
  """Whether --drift_profile (other than `none`) or --write_drift_profile was given."""
  from beam_dl.cli.options import DriftOptions

  opts = options.view_as(DriftOptions)
  return bool((opts.drift_profile and opts.drift_profile != OFF) or opts.write_drift_profile)


def training_profile(model_dir: str) -> str | None:
  """The input profile training saved in `model_dir` (also `models:/...`), or None."""
  from apache_beam.io.filesystems import FileSystems

  from beam_dl.models import checkpoints

  path = FileSystems.join(checkpoints.resolve(model_dir), drift.PROFILE_FILE)
  return path if FileSystems.exists(path) else None


class _WarnOnDriftFn(beam.DoFn):
  """A drift report -> one warning line when a feature drifted (the report passes through)."""

  def __init__(self, profile_path: str, alert: float):
    self._path, self._alert = profile_path, alert

  def process(self, report):
    if report['drifted']:
      features = report['features']
      worst = ', '.join(f'{name} PSI {features[name]["psi"]:.2f}' for name in report['drifted'])
      count = max(v['count'] for v in features.values())
      _log.warning(
        "inputs differ from the model's training inputs (%s >= %g over %d sampled inputs): are they on "
        'the scale and preprocessing it was trained on? (profile %s; --drift_profile none turns the '
        'check off)',
        worst,
        self._alert,
        count,
        self._path,
      )
    yield report


@beam.typehints.with_input_types(Union[EncodedImage, DecodedImage, Event])
class CheckAgainstTraining(beam.PTransform):
  """Inputs in batch -> the drift report of a sample of them against the
  profile training saved in the model directory.

  `sample` inputs (Beam's reservoir sample, so the cost does not grow with
  the input) become feature dicts by `features(element)` (an iterable: an
  image that does not decode gives none) and are compared with the training
  inputs: the gauges `beam_dl.drift` psi_e6/js_e6 per feature, an `alerts`
  counter, and one warning line when a feature drifted (PSI >= alert_psi),
  so a model served on data of another scale is noticed at once. The one
  home of that check: `classify_images_drift` passes image features,
  `score_sequences_drift` event value fields.

  Args:
    profile_path: training's profile, named in the warning.
    features: element -> feature dicts; picklable (a module function or a
      functools.partial of one).
    profile: the DriftProfile to compare with (default: `profile_path`'s),
      e.g. a sequence profile renamed to serving's field names.
  """

  def __init__(
    self,
    profile_path: str,
    features,
    alert_psi: float = drift.ALERT_PSI,
    min_count: int = 20,
    sample: int = TRAINING_SAMPLE,
    profile: drift.DriftProfile | None = None,
  ):
    super().__init__()
    self._path, self._features, self._alert, self._min_count, self._sample = (
      profile_path,
      features,
      alert_psi,
      min_count,
      sample,
    )
    self._profile = profile if profile is not None else drift.load_profile(profile_path)

  def expand(self, inputs):
    reports = (
      inputs
      | 'GlobalWindow' >> beam.WindowInto(beam.window.GlobalWindows())
      | 'SampleInputs' >> beam.combiners.Sample.FixedSizeGlobally(self._sample)
      | 'Unlist' >> beam.FlatMap(lambda sample: sample)
      | 'DriftFeatures' >> beam.FlatMap(self._features)
      | 'ComputeDrift' >> ComputeDrift(self._profile, alert_psi=self._alert, min_count=self._min_count)
    )
    return reports.reports | 'WarnOnDrift' >> beam.ParDo(_WarnOnDriftFn(self._path, self._alert))


def _training_check(options, pcoll, model_dir: str, fields=None):
  """The default check of a batch run against training's profile
  (`CheckAgainstTraining`) when the run has no --drift_profile /
  --write_drift_profile, isn't `--drift_profile none`, and the model
  directory holds a profile (older models have none: no check, no message).
  Images without `fields`; events with the value `fields` (channel i of
  the sequence profile is fields[i]). Returns the reports, or None."""
  from beam_dl.cli.options import DriftOptions
  from beam_dl.features.windows import is_batch

  opts = options.view_as(DriftOptions)
  path = None if opts.drift_profile == OFF or not is_batch(pcoll) else training_profile(model_dir)
  if path is None:
    return None
  if fields is None:
    profile, features = None, functools.partial(image_features, spec=_model_image_spec(model_dir))
  else:
    profile = drift.fields_profile(drift.load_profile(path), fields)
    if profile is None:  # a profile without input channels: nothing to compare the events with
      return None
    features = functools.partial(_event_feature_list, fields=tuple(fields))
  return pcoll | 'CheckAgainstTraining' >> CheckAgainstTraining(
    path, features, opts.drift_alert_psi, opts.drift_min_count, profile=profile
  )


def attach_drift(
  options,
  features: dict[str, beam.PCollection],
  output: str,
  default_window: tuple[float, float | None] | None = None,
  writer=None,
):
  """Adds drift steps to a pipeline over the named feature PCollections.

  --write_drift_profile PATH: the features build a reference profile
  (a batch run over reference data: the profile is written when the input
  ends, so an unbounded stream never writes it).
  --drift_profile PATH: ComputeDrift, writing `<output>_drift-*.jsonl`
  (reports) and `<output>_alerts-*.jsonl` (side outputs, apart from the
  main output's `<output>-*`). `default_window`
  (size, period) is used when --drift_window_size is not given (streaming
  pipelines pass their scoring window; a batch run is then one window).
  `writer(prefix)` is the PTransform that writes records (default: one
  global window through WriteJsonLines; streaming pipelines pass theirs).
  Returns the DriftOutputs, or None when only a profile is written.
  """
  from beam_dl.cli.options import DriftOptions

  opts = options.view_as(DriftOptions)
  # One windowing for the Flatten (inputs and predictions may come windowed
  # differently); timestamps are kept, and ComputeDrift windows them again.
  merged = [
    pcoll | f'{name}DriftGlobalWindow' >> beam.WindowInto(beam.window.GlobalWindows())
    for name, pcoll in features.items()
  ] | 'DriftFeatures' >> beam.Flatten()
  if opts.write_drift_profile:
    merged | 'BuildDriftProfile' >> BuildDriftProfile(opts.write_drift_profile, opts.drift_bins, source=output)
  if not opts.drift_profile or opts.drift_profile == OFF:
    return None
  size, period = opts.drift_window_size, opts.drift_window_period
  if size is None and default_window is not None:
    size, period = default_window
  outputs = merged | 'ComputeDrift' >> ComputeDrift(
    opts.drift_profile, size, period, opts.drift_warn_psi, opts.drift_alert_psi, opts.drift_min_count
  )
  _write(outputs.reports, 'WriteDriftReports', side_output(output, DRIFT), writer)
  _write(outputs.alerts, 'WriteDriftAlerts', side_output(output, ALERTS), writer)
  return outputs


def _write(pcoll, label: str, prefix: str, writer):
  from transforms.io import WriteJsonLines

  if writer is not None:
    return pcoll | label >> writer(prefix)
  pcoll = pcoll | f'{label}GlobalWindow' >> beam.WindowInto(beam.window.GlobalWindows())
  return pcoll | label >> WriteJsonLines(prefix)


# -- features of beam_dl's pipelines -----------------------------------------------


def _model_image_spec(model_dir: str):
  from beam_dl.decoding.images import ImageSpec
  from beam_dl.models import checkpoints

  height, width, channels = checkpoints.load_spec(model_dir).input_shape
  return ImageSpec(height=height, width=width, channels=channels)


def classify_images_drift(options, images, predictions, model_dir: str, output: str):
  """classify_images' drift: image brightness/contrast and the predicted class and score.

  Without --drift_profile / --write_drift_profile, a batch run whose model
  directory holds training's input profile is checked against it
  (`CheckAgainstTraining`); --drift_profile none turns that off.
  """
  if not drift_enabled(options):
    return _training_check(options, images, model_dir)
  spec = _model_image_spec(model_dir)
  return attach_drift(
    options,
    {
      'Images': images | 'ImageDriftFeatures' >> beam.FlatMap(image_features, spec),
      'Predictions': predictions | 'PredictionDriftFeatures' >> beam.Map(classification_features),
    },
    output,
  )


def score_sequences_drift(
  options, events, scores, fields, output: str, model_dir: str, streaming_window=None, writer=None
):
  """score_sequences' drift: each event's value fields and each window's score or outputs.

  Without --drift_profile / --write_drift_profile, a batch run whose model
  directory holds training's input profile checks a sample of its events'
  value fields against it (`CheckAgainstTraining`; the profile's channel
  `input/<i>` is `fields[i]`); --drift_profile none turns that off, and
  streaming runs have no default check.
  """
  if not drift_enabled(options):
    return _training_check(options, events, model_dir, fields)
  return attach_drift(
    options,
    {
      'Events': events | 'EventDriftFeatures' >> beam.Map(event_features, tuple(fields)),
      'Scores': scores | 'ScoreDriftFeatures' >> beam.Map(score_features),
    },
    output,
    streaming_window,
    writer,
  )


def image_features(element, spec) -> list[dict]:
  """(key, encoded image, its fileio.ReadableFile, or decoded pixels) ->
  [{"image/brightness", "image/contrast"}] (`drift.image_statistics`).

  Decoded at the model's input size; an image that does not read or decode
  yields nothing here (it is already a dead letter of the classification path).
  """
  from beam_dl.decoding.images import ImageDecodeError, decode_image
  from beam_dl.io import files

  try:
    pixels = element[1] if isinstance(element[1], np.ndarray) else decode_image(files.content(element[1]), spec)
  except (ImageDecodeError, files.FileReadError):
    return []
  return [{name: float(value) for name, value in drift.image_statistics(pixels).items()}]


def classification_features(record: dict) -> dict:
  """A classification record -> {"prediction/label", "prediction/score"}."""
  return {f'{drift.PREDICTION_PREFIX}label': record['label'], f'{drift.PREDICTION_PREFIX}score': record['score']}


def event_features(event, fields) -> dict:
  """An `Event` -> {field: value} of its value fields."""
  return dict(zip(fields, event.values))


def _event_feature_list(event, fields) -> list[dict]:
  return [event_features(event, fields)]


def score_features(record: dict) -> dict:
  """A score_sequences record -> {"prediction/score"} (forecast) or {"prediction/output"}."""
  if 'score' in record:
    return {f'{drift.PREDICTION_PREFIX}score': record['score']}
  return {f'{drift.PREDICTION_PREFIX}output': record['outputs']}
