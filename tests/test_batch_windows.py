"""The vectorised batch path of WindowedFeatures gives the streaming path's records."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from beam_dl.features import WindowSpec
from beam_dl.features import batch_windows
from beam_dl.io.events import Event
from transforms.windowing import EventTimestamps, WindowedFeatures


def _events():
  rng = np.random.default_rng(1)
  events = [Event(f'k{rng.integers(0, 5)}', float(rng.uniform(-30, 600)),
                  (float(rng.normal()), float(rng.integers(0, 3)))) for _ in range(1500)]
  # same time, different values: "last" is the largest value tuple on both paths
  events += [Event('tie', 10.0, (1.0, 2.0)), Event('tie', 10.0, (3.0, 0.0)), Event('tie', 10.0, (2.0, 5.0))]
  # on a window boundary, and a fractional microsecond
  events += [Event('edge', 60.0, (1.0, 1.0)), Event('edge', 59.9999995, (2.0, 2.0))]
  return events


def _matches(expected_records):
  expected = {(r['key'], r['window_start']): r for r in expected_records}

  def check(actual_records):
    actual = {(r['key'], r['window_start']): r for r in actual_records}
    assert sorted(actual) == sorted(expected)
    for k, record in actual.items():
      assert sorted(record) == sorted(expected[k])
      for field, value in record.items():
        if isinstance(value, (float, list)):
          assert value == pytest.approx(expected[k][field], rel=1e-9, abs=1e-12), (k, field)
        else:
          assert value == expected[k][field], (k, field)
  return check


@pytest.mark.parametrize('spec', [WindowSpec('fixed', size=60.0),
                                  WindowSpec('sliding', size=60.0, period=20.0)], ids=['fixed', 'sliding'])
def test_batch_path_gives_the_streaming_paths_records(spec):
  events = _events()
  with TestPipeline() as p:
    stamped = p | beam.Create(events) | EventTimestamps()
    streaming_path = (stamped | 'Streaming' >> WindowedFeatures(spec, route_late=False, batch_path=False)).records
    batch_path = (stamped | 'Batch' >> WindowedFeatures(spec, batch_path=True)).records
    # both in the global window, each record tagged with the window/timestamp it was in
    # (in milliseconds: the portable runner encodes timestamps that crossed a stage in ms)
    def tagged(record, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam):
      return {**record, '_window': (w.start.micros, w.end.micros), '_timestamp_ms': int(t.micros / 1000)}

    expected = (streaming_path | 'TagExpected' >> beam.Map(tagged)
                | 'GlobalExpected' >> beam.WindowInto(beam.window.GlobalWindows())
                | 'Expected' >> beam.combiners.ToList())
    actual = (batch_path | 'TagActual' >> beam.Map(tagged)
              | 'GlobalActual' >> beam.WindowInto(beam.window.GlobalWindows()))
    assert_that(actual | 'Actual' >> beam.combiners.ToList() | 'Compare' >> beam.Map(
        lambda a, exp: _matches(exp)(a) or len(a), exp=beam.pvalue.AsSingleton(expected)),
        lambda n: _at_least(n, 50))


def _at_least(n, minimum):
  assert n[0] >= minimum, n


def test_applies_only_to_bounded_batch_fixed_or_sliding_without_early_panes():
  p = beam.Pipeline(options=PipelineOptions([]))
  bounded = p | beam.Create([1])
  assert batch_windows.applies(WindowSpec('fixed', size=60.0), bounded)
  assert batch_windows.applies(WindowSpec('sliding', size=60.0, period=30.0), bounded)
  assert not batch_windows.applies(WindowSpec('session', gap=10.0), bounded)
  assert not batch_windows.applies(WindowSpec('fixed', size=60.0, early_after_count=5), bounded)
  streaming = beam.Pipeline(options=PipelineOptions(['--streaming']))
  assert not batch_windows.applies(WindowSpec('fixed', size=60.0), streaming | beam.Create([1]))


@pytest.mark.parametrize('spec', [WindowSpec('fixed', size=7.5), WindowSpec('sliding', size=10.0, period=3.0),
                                  WindowSpec('sliding', size=10.0, period=4.0)])
def test_window_starts_are_beams_assignment(spec):
  times = np.array([-12.3, -0.000001, 0.0, 2.9999999, 3.0, 9.99, 10.0, 123.456789])
  micros = np.array([beam.utils.timestamp.Timestamp.of(t).micros for t in times], np.int64)
  index, starts, size = batch_windows.window_starts(micros, spec)
  for i, t in enumerate(times):
    expected = sorted(w.start.micros for w in spec.assign(t))
    assert sorted(starts[index == i].tolist()) == expected, t
    assert all(w.end.micros - w.start.micros == size for w in spec.assign(t))
