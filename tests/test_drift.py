"""Drift: profiles, PSI / Jensen-Shannon, ComputeDrift in batch and streaming, pipeline flags.

Real data: scikit-learn's digits (64 pixel features and the class) and the
Mauna Loa CO2 record (statsmodels), with a shift injected into one feature.
"""

import glob
import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from beam_dl.formats.jsonl import read_jsonl
from beam_dl.operations import drift
from tests.waiting import wait_for, was_read
from transforms.drift import BuildDriftProfile, ComputeDrift, HistogramsCombineFn
from transforms.io import WriteJsonLines

SHIFTED = 'pixel_20'
WEEK = 7 * 24 * 3600.0


@pytest.fixture(scope='module')
def digits_split():
  from sklearn.datasets import load_digits

  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.data))
  return digits, order[:1400], order[1400:]


def digit_records(digits, rows, shift: float = 0.0) -> list[dict]:
  """Pixel features + the class as prediction; `shift` added to SHIFTED (clipped to 0..16)."""
  records = []
  for i in rows:
    record = {f'pixel_{j}': float(digits.data[i, j]) for j in range(64)}
    record[SHIFTED] = min(record[SHIFTED] + shift, 16.0)
    record['prediction/label'] = int(digits.target[i])
    records.append(record)
  return records


@pytest.fixture(scope='module')
def digits_profile(digits_split):
  digits, train, _ = digits_split
  return drift.build_profile(drift.columns_of(digit_records(digits, train)))


def test_psi_and_js_match_their_definitions():
  expected, actual = np.array([0.5, 0.5]), np.array([0.25, 0.75])
  by_hand = (0.25 - 0.5) * np.log(0.25 / 0.5) + (0.75 - 0.5) * np.log(0.75 / 0.5)
  assert drift.psi(expected, actual) == pytest.approx(by_hand, rel=1e-3)
  assert drift.psi(expected, expected) == pytest.approx(0.0, abs=1e-12)
  mixture = (expected + actual) / 2
  kl = lambda p, q: np.sum(p * np.log2(p / q))
  assert drift.js_distance(expected, actual) == pytest.approx(
    np.sqrt((kl(expected, mixture) + kl(actual, mixture)) / 2)
  )
  assert drift.js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
  assert [drift.level(v) for v in (0.05, 0.1, 0.2, 0.25, 3)] == [
    'stable',
    'moderate',
    'moderate',
    'significant',
    'significant',
  ]


def test_profile_bins_quantiles_classes_and_missing(digits_profile, tmp_path):
  label = digits_profile.features['prediction/label']
  assert label.edges == tuple(k + 0.5 for k in range(9))  # one bin per class
  assert sum(label.probabilities) == pytest.approx(1.0)
  pixel = digits_profile.features['pixel_36']
  assert len(pixel.edges) <= 9 and pixel.probabilities[-1] == 0.0  # quantile edges, no missing values
  assert digits_profile.features['pixel_0'].edges == ()  # constant 0: one value bin
  counts = drift.bin_counts(np.array([0.5, 1.5]), [0, 0.5, 1, 2, float('nan'), float('inf'), -3])
  assert counts.tolist() == [3, 1, 1, 2]  # x <= 0.5 | 0.5 < x <= 1.5 | > 1.5 | missing
  path = drift.save_profile(digits_profile, str(tmp_path / 'drift_profile.json'))
  assert drift.load_profile(str(tmp_path)) == digits_profile == drift.load_profile(path)


def test_profile_from_tf_transform_stats():
  stats = {
    'length/boundaries': [3.0, 7.0, 12.0],
    'co2/mean': [350.0],
    'co2/var': [100.0],
    'co2/min': [310.0],
    'co2/max': [380.0],
  }
  profile = drift.profile_from_stats(stats, num_bins=4)
  assert profile.features['length'].edges == (3.0, 7.0, 12.0)
  assert profile.features['length'].probabilities == (0.25, 0.25, 0.25, 0.25, 0.0)
  assert profile.features['co2'].edges == pytest.approx((350 - 6.7449, 350.0, 350 + 6.7449), abs=1e-3)
  with pytest.raises(ValueError, match='no <name>/boundaries'):
    drift.profile_from_stats({'x/min': [0.0]})


def test_sequence_input_profile_one_feature_per_channel_without_padding():
  x = np.zeros((2, 4, 2))
  x[0, :3] = [[1, 10], [2, 20], [3, 30]]  # 3 real steps, 1 padded
  x[1, :1] = [[4, 40]]  # 1 real step, 3 padded
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  profile = drift.sequence_input_profile([(x, mask)], num_bins=4)
  assert sorted(profile.features) == ['input/0', 'input/1']
  assert profile.features['input/0'].count == 4  # padding left out
  assert profile.features['input/1'].edges == (15.0, 25.0, 35.0)  # one bin per value: 10, 20, 30, 40
  renamed = drift.fields_profile(profile, ['co2', 'temp'])
  assert renamed.features == {'co2': profile.features['input/0'], 'temp': profile.features['input/1']}
  assert drift.fields_profile(drift.build_profile({'image/brightness': [0.5]}), ['co2']) is None


def test_histograms_merge_like_one_pass(digits_split, digits_profile):
  digits, _, test = digits_split
  records = digit_records(digits, test)
  fn = HistogramsCombineFn(digits_profile)
  whole = fn.extract_output(fn.add_inputs(fn.create_accumulator(), records))
  parts = [fn.add_inputs(fn.create_accumulator(), records[i::3]) for i in range(3)]
  merged = fn.extract_output(fn.merge_accumulators(parts))
  for name in whole.counts:
    assert whole.counts[name].tolist() == merged.counts[name].tolist()
  assert int(whole.counts['pixel_5'].sum()) == len(records)


def _drift_report(records, profile, out_dir, **kwargs):
  """(reports, alert features) of ComputeDrift over `records`, through files in `out_dir`."""
  with TestPipeline(options=PipelineOptions(['--runner=FnApiRunner'])) as p:
    out = p | beam.Create(records) | ComputeDrift(profile, min_count=20, **kwargs)
    out.reports | 'WriteReports' >> WriteJsonLines(f'{out_dir}/reports')
    out.alerts | 'WriteAlerts' >> WriteJsonLines(f'{out_dir}/alerts')
  return read_jsonl(f'{out_dir}/reports-*'), [a['feature'] for a in read_jsonl(f'{out_dir}/alerts-*')]


def test_shifted_feature_alerts_and_the_others_do_not(digits_split, digits_profile, tmp_path):
  digits, _, test = digits_split
  reports, alerts = _drift_report(digit_records(digits, test, shift=4.0), digits_profile, tmp_path / 'shifted')
  (report,) = reports
  assert alerts == [SHIFTED] and report['drifted'] == [SHIFTED]
  features = report['features']
  assert features[SHIFTED]['level'] == 'significant' and features[SHIFTED]['js'] > 0.2
  others = {k: v for k, v in features.items() if k != SHIFTED}
  assert len(others) == 64  # the 63 other pixels and the predicted class
  assert max(v['psi'] for v in others.values()) < 0.1
  assert {v['level'] for v in others.values()} == {'stable'}
  assert report['window_start'] is None  # batch without a window size: one global window

  reports, alerts = _drift_report(digit_records(digits, test), digits_profile, tmp_path / 'same')
  assert alerts == [] and reports[0]['max_psi'] < 0.1


def co2_events():
  """Weekly Mauna Loa CO2 changes (ppm/week) with event times; the last 40% shifted +0.5."""
  import statsmodels.api as sm

  data = sm.datasets.co2.load_pandas().data['co2'].interpolate()
  values = np.diff(data.to_numpy(np.float64))
  times = data.index.values.astype('datetime64[s]').astype(np.int64)[1:].astype(np.float64)
  cut = int(len(values) * 0.6)
  shifted = values.copy()
  shifted[cut:] += 0.5
  events = [({'co2_change': float(v), 'co2_raw_change': float(r)}, float(t)) for v, r, t in zip(shifted, values, times)]
  return events, drift.build_profile({'co2_change': values[:cut], 'co2_raw_change': values[:cut]})


def _only(value):
  def check(got):
    if not got or set(got) != {value}:
      raise BeamAssertException(f'expected only {value!r}, got {sorted(set(got))}')

  return check


def _report_key(report):
  return (report['window_start'], json.dumps(report['features'], sort_keys=True))


@pytest.mark.slow
def test_batch_and_teststream_give_the_same_numbers_in_sliding_windows(tmp_path):
  events, profile = co2_events()
  # Five-year windows a year apart; windows at the ends hold less than ~5 years and are not judged.
  size, period = 260 * WEEK, 52 * WEEK
  transform = lambda: ComputeDrift(profile, window_size=size, window_period=period, min_count=250)

  with TestPipeline(options=PipelineOptions(['--runner=FnApiRunner'])) as p:
    batch = p | beam.Create(events) | beam.MapTuple(beam.window.TimestampedValue) | transform()
    batch.reports | WriteJsonLines(str(tmp_path / 'batch'))
  expected = [_report_key(r) for r in read_jsonl(str(tmp_path / 'batch-*'))]
  assert len(expected) > 30

  stream = TestStream()
  for start in range(0, len(events), 200):
    chunk = events[start : start + 200]
    stream = stream.add_elements([beam.window.TimestampedValue(e, t) for e, t in chunk])
    stream = stream.advance_watermark_to(chunk[-1][1])
  stream = stream.advance_watermark_to_infinity()
  options = PipelineOptions(['--runner=DirectRunner'])
  options.view_as(StandardOptions).streaming = True
  with TestPipeline(options=options) as p:
    streamed = p | stream | transform()
    assert_that(streamed.reports | 'Keys' >> beam.Map(_report_key), equal_to(expected))
    # Windows wholly after the shift alert on co2_change; the unshifted copy never alerts.
    alerted = streamed.alerts | 'Features' >> beam.Map(lambda a: a['feature'])
    assert_that(alerted, _only('co2_change'), label='OnlyShiftedAlerts')


def test_build_profile_transform_writes_the_same_profile(digits_split, digits_profile, tmp_path):
  digits, train, _ = digits_split
  path = str(tmp_path / 'profile.json')
  with TestPipeline(options=PipelineOptions(['--runner=FnApiRunner'])) as p:
    _ = p | beam.Create(digit_records(digits, train)) | BuildDriftProfile(path)
  assert drift.load_profile(path).features == digits_profile.features


# -- the pipelines' --drift_profile / --write_drift_profile flags ----------------------------


def _write_pngs(directory, images, brighten: int = 0):
  from PIL import Image

  os.makedirs(directory, exist_ok=True)
  for i, image in enumerate(images):
    pixels = np.clip(image.astype(np.int32) + brighten, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(directory, f'{i:04d}.png'))
  return os.path.join(directory, '*.png')


@pytest.mark.slow
def test_classify_images_drift_flags_on_real_digits(digits_model_dir, tmp_path):
  from pipelines import classify_images, demo

  x_train, x_test, _, _ = demo.digit_images()
  profile = str(tmp_path / 'drift_profile.json')
  common = ['--model_dir', digits_model_dir, '--runner', 'FnApiRunner']
  classify_images.run(
    [
      '--input',
      _write_pngs(tmp_path / 'train', x_train[:600]),
      '--output',
      str(tmp_path / 'ref' / 'pred'),
      '--write_drift_profile',
      profile,
      '--drift_profile',
      'none',  # writing a profile, checking against none
      *common,
    ]
  )
  assert not glob.glob(str(tmp_path / 'ref' / 'pred_drift-*'))
  assert set(drift.load_profile(profile).features) == {
    'image/brightness',
    'image/contrast',
    'prediction/label',
    'prediction/score',
  }

  for name, brighten in (('same', 0), ('bright', 60)):
    out = str(tmp_path / name / 'pred')
    classify_images.run(
      ['--input', _write_pngs(tmp_path / name, x_test, brighten), '--output', out, '--drift_profile', profile, *common]
    )
    (report,) = read_jsonl(f'{out}_drift-0*.jsonl')
    alerts = read_jsonl(f'{out}_alerts-*.jsonl')
    assert report['features']['image/brightness']['count'] == len(x_test)
    assert len(read_jsonl(f'{out}-0*.jsonl')) == len(x_test)  # predictions unaffected
    if brighten:
      assert 'image/brightness' in {a['feature'] for a in alerts}
      assert report['features']['image/brightness']['level'] == 'significant'
    else:
      assert alerts == [] and report['max_psi'] < 0.1


@pytest.mark.slow
def test_score_sequences_streaming_drift_per_window(tmp_path):
  """Streaming over a watched directory: drift per scoring window, written by the streaming writer."""
  import threading

  from pipelines import score_sequences
  from pipelines import score_sequences_demo as demo

  times, values = demo.load_series()
  model = str(tmp_path / 'model')
  demo.train_model(model, values[:400], steps=20, cell='gru', pooling='last')
  reference = values[:400][np.isfinite(values[:400])]  # 1958-1966: 313-322 ppm
  profile = drift.save_profile(drift.build_profile({'co2': reference}), str(tmp_path / 'drift_profile.json'))
  watched = tmp_path / 'incoming'
  watched.mkdir()
  series = {'early': reference[:30].tolist(), 'late': (reference[:30] + 40.0).tolist()}  # 40 ppm up

  def land_file(i, key):  # renamed in atomically
    tmp = watched / f'.part{i}'
    with open(tmp, 'w') as f:
      for step, value in enumerate(series[key]):
        f.write(json.dumps({'key': key, 'time': 1000.0 + step, 'co2': value}) + '\n')
    path = watched / f'events{i}.jsonl'
    os.rename(tmp, path)
    return str(path)

  first = land_file(0, 'early')
  read = {}

  def land_second_file():  # lands while the pipeline runs, once it has read the first
    read['first'] = wait_for(lambda: was_read(first), deadline_s=30)
    land_file(1, 'late')

  writer = threading.Thread(target=land_second_file)
  writer.start()
  out = str(tmp_path / 'out' / 'scores')
  score_sequences.run(
    [
      '--streaming',
      '--input',
      str(watched / '*.jsonl'),
      '--model_dir',
      model,
      '--output',
      out,
      '--event_value_fields',
      'co2',
      '--window',
      'fixed',
      '--window_size',
      '3600',
      '--seq_len',
      '8',
      '--forecast',
      '--stop_after_secs',
      '8',
      '--poll_interval_secs',
      '0.5',
      '--write_frequency_secs',
      '2',
      '--drift_profile',
      profile,
      '--drift_min_count',
      '20',
    ]
  )
  writer.join()
  assert read['first'], 'the pipeline never read the first file'
  reports = read_jsonl(f'{out}_drift-*.jsonl')
  alerts = read_jsonl(f'{out}_alerts-*.jsonl')
  # Streaming windows follow the source's timestamps (file read time): one hour-long window,
  # two if the run crosses an hour; one report per window (the default trigger fires once).
  assert len({r['window_start'] for r in reports}) == len(reports) >= 1
  assert sum(r['features']['co2']['count'] for r in reports if 'co2' in r['features']) == 60
  assert 'significant' in {r['features']['co2']['level'] for r in reports if 'co2' in r['features']}
  assert {a['feature'] for a in alerts} >= {'co2'}


# -- serving checks its inputs against training's profile by default ------------------------


def _training_check(run, argv, caplog) -> tuple[list[str], dict[str, int]]:
  """Runs a pipeline; (its 'training inputs' warning lines, its drift PSI gauges by name)."""
  import logging

  from apache_beam.metrics.metric import MetricsFilter

  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='beam_dl'):
    result = run(argv)
  gauges = result.metrics().query(MetricsFilter().with_namespace('beam_dl.drift'))['gauges']
  return (
    [r.getMessage() for r in caplog.records if 'training inputs' in r.getMessage()],
    {g.key.metric.name: g.committed.value for g in gauges if 'psi' in g.key.metric.name},
  )


@pytest.mark.slow
def test_classify_images_warns_once_when_inputs_are_not_on_the_training_scale(digits_model_dir, tmp_path, caplog):
  """The model directory holds the profile of its training inputs (0..255 digits). Digits on the 0..16
  scale give one warning line and the PSI gauge; the same digits on 0..255 give neither; `none` turns it off."""
  import shutil

  from pipelines import classify_images, demo

  x_train, x_test, _, _ = demo.digit_images()
  model_dir = str(tmp_path / 'model')
  shutil.copytree(digits_model_dir, model_dir)
  drift.save_profile(drift.input_profile([x_train[..., None]]), os.path.join(model_dir, drift.PROFILE_FILE))
  small = np.round(x_test.astype(np.float32) * 16 / 255).astype(np.uint8)  # what load_digits holds
  runs = {}
  for name, images, extra in (('same', x_test, []), ('small', small, []), ('off', small, ['--drift_profile', 'none'])):
    argv = ['--input', _write_pngs(tmp_path / name, images), '--model_dir', model_dir]
    argv += ['--output', str(tmp_path / name / 'pred'), '--runner', 'FnApiRunner', *extra]
    runs[name] = _training_check(classify_images.run, argv, caplog)
    assert len(read_jsonl(str(tmp_path / name / 'pred-0*.jsonl'))) == len(x_test)  # predictions unaffected
  warnings, gauges = runs['small']
  assert len(warnings) == 1 and 'image/brightness PSI' in warnings[0], warnings
  (brightness,) = [v for k, v in gauges.items() if 'brightness' in k]
  assert brightness > 250_000  # PSI in millionths: significant
  warnings, gauges = runs['same']
  (brightness,) = [v for k, v in gauges.items() if 'brightness' in k]
  assert warnings == [] and brightness < 100_000
  assert runs['off'] == ([], {})
  assert not [p for p in os.listdir(tmp_path / 'small') if 'drift' in p or 'alerts' in p]  # no files by default


@pytest.fixture(scope='module')
def co2_trained_dir(tmp_path_factory):
  """A co2 forecaster trained by `pipelines.train` on the co2_rnn config's SequenceExamples (two steps:
  the drift check needs training's input profile, not a good model)."""
  from pipelines import train as train_cli

  workdir = str(tmp_path_factory.mktemp('co2_trained'))
  flags = ['num_steps=2', 'log_every=1', 'checkpoint_every=0', 'eval_batch_size=512']
  train_cli.main(
    ['--config', 'pipelines/configs/co2_rnn.py:runlocal', '--workdir', workdir, '--tensorboard_dir', 'none']
    + [arg for flag in flags for arg in ('--set', flag)]
    + ['--log_level', 'WARNING']
  )
  return os.path.join(workdir, 'model')


@pytest.mark.slow
def test_score_sequences_warns_once_when_events_are_not_on_the_training_scale(co2_trained_dir, tmp_path, caplog):
  """Training saved one feature per input channel (`input/0`, CO2 relative to a window's last month);
  score_sequences reads it as its first value field. Events of the training windows give no warning; the
  same events x100 give one warning line naming the field and the PSI gauge; `none` turns it off."""

  from beam_dl.training import datasets
  from pipelines import score_sequences

  profile = drift.load_profile(co2_trained_dir)
  assert list(profile.features) == ['input/0']
  windows, _ = datasets.co2_windows(24)
  assert profile.features['input/0'].count == int(len(windows) * 0.8) * 24  # every step of every training window
  sample = windows[: int(len(windows) * 0.8) : 5, :, 0]  # 81 training windows across the years, 24 months each

  def write_events(path, scale):
    with open(path, 'w') as f:
      for i, window in enumerate(sample):
        for step, value in enumerate(window):
          f.write(json.dumps({'key': f'w{i}', 'time': 1000.0 + step, 'co2_change': float(value) * scale}) + '\n')
    return str(path)

  runs = {}
  for name, scale, extra in (('same', 1, []), ('scaled', 100, []), ('off', 100, ['--drift_profile', 'none'])):
    out = str(tmp_path / name / 'scores')
    argv = ['--input', write_events(tmp_path / f'{name}.jsonl', scale), '--model_dir', co2_trained_dir]
    argv += ['--output', out, '--event_value_fields', 'co2_change', '--window', 'global', '--seq_len', '24']
    runs[name] = _training_check(score_sequences.run, argv + ['--runner', 'FnApiRunner', *extra], caplog)
    assert len(read_jsonl(f'{out}-0*.jsonl')) == len(sample)  # every key scored: scores unaffected
  warnings, gauges = runs['scaled']
  assert len(warnings) == 1 and 'co2_change PSI' in warnings[0], warnings
  ((name, psi),) = gauges.items()
  assert 'co2_change' in name and psi > 250_000  # PSI in millionths: significant
  warnings, gauges = runs['same']
  ((name, psi),) = gauges.items()
  assert warnings == [] and 'co2_change' in name and psi < 250_000  # a 256-event sample: not significant
  assert runs['off'] == ([], {})
  assert not [p for p in os.listdir(tmp_path / 'scaled') if 'drift' in p or 'alerts' in p]  # no files by default
