"""Unit tests of the windowed-feature maths (no pipeline): beam_dl.features."""

import math
import random

import numpy as np
import pytest
from apache_beam.transforms import trigger as tr
from apache_beam.transforms.window import IntervalWindow

from beam_dl.features import (
  LastNFn,
  Sequence,
  SpectrogramSpec,
  WindowSpec,
  WindowStats,
  WindowStatsFn,
  features_record,
  pad_events,
  place_samples,
  spectrogram,
  stats_of_arrays,
)

EVENTS = [(1.0, (1.0, 10.0)), (3.0, (2.0, 20.0)), (2.0, (6.0, -5.0))]


def _hand_features():
  # feature 0: 1, 2, 6 -> sum 9, mean 3, var ((4 + 1 + 9) / 3) = 14/3
  # feature 1: 10, 20, -5 -> sum 25, mean 25/3
  mean1 = 25 / 3
  var1 = ((10 - mean1) ** 2 + (20 - mean1) ** 2 + (-5 - mean1) ** 2) / 3
  return {
    'count': 3,
    'sum': [9.0, 25.0],
    'mean': [3.0, mean1],
    'std': [math.sqrt(14 / 3), math.sqrt(var1)],
    'min': [1.0, -5.0],
    'max': [6.0, 20.0],
    'last': [2.0, 20.0],
    'first_time': 1.0,
    'last_time': 3.0,
  }


def _assert_features(got, want):
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-12, err_msg=name)


def test_stats_match_hand_computation():
  fn = WindowStatsFn()
  acc = fn.create_accumulator()
  for event in EVENTS:
    acc = fn.add_input(acc, event)
  _assert_features(fn.extract_output(acc), _hand_features())


def test_merge_equals_one_pass_in_any_split_and_order():
  rng = random.Random(0)
  events = [(float(rng.randint(0, 50)), (rng.uniform(-5, 5), rng.uniform(0, 1e6))) for _ in range(200)]
  fn = WindowStatsFn()
  want = stats_of_arrays(np.array([e[0] for e in events]), np.array([e[1] for e in events])).features()
  for trial in range(5):
    rng.shuffle(events)
    cut1, cut2 = sorted(rng.sample(range(1, len(events)), 2))
    parts = [events[:cut1], events[cut1:cut2], events[cut2:]]
    accs = []
    for part in parts:
      acc = fn.create_accumulator()
      for event in part:
        acc = fn.add_input(acc, event)
      accs.append(acc)
    accs.insert(trial % 3, fn.create_accumulator())  # empty accumulators merge too
    got = fn.extract_output(fn.merge_accumulators(accs))
    assert got['count'] == want['count'] and got['last'] == want['last']
    for name in ('sum', 'mean', 'std', 'min', 'max'):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-9, err_msg=name)


def test_vectorised_add_inputs_matches_per_event_adds():
  rng = np.random.default_rng(1)
  events = [(float(t), (float(v),)) for t, v in zip(rng.integers(0, 10, 100), rng.normal(size=100))]
  fn = WindowStatsFn()
  one_by_one = fn.create_accumulator()
  for event in events:
    fn.add_input(one_by_one, event)
  batched = fn.add_inputs(fn.create_accumulator(), events)
  a, b = one_by_one.features(), batched.features()
  assert a['count'] == b['count'] == 100 and a['last'] == b['last'] and a['last_time'] == b['last_time']
  np.testing.assert_allclose(a['std'], b['std'], rtol=1e-12)


def test_last_breaks_time_ties_by_value_not_arrival():
  a, b = WindowStats(), WindowStats()
  for event in [(5.0, (1.0,)), (5.0, (3.0,)), (4.0, (9.0,))]:
    a.add(*event)
  for event in [(4.0, (9.0,)), (5.0, (3.0,)), (5.0, (1.0,))]:
    b.add(*event)
  assert a.features()['last'] == b.features()['last'] == [3.0]


def test_stats_reject_mismatched_widths():
  stats = WindowStats().add(0.0, (1.0, 2.0))
  with pytest.raises(ValueError, match='values'):
    stats.add(1.0, (1.0,))


def test_features_record_adds_window_and_rate():
  record = features_record('k', 10.0, 40.0, {'count': 6}, 'ON_TIME', 0)
  assert record == {
    'key': 'k',
    'window_start': 10.0,
    'window_end': 40.0,
    'pane': 'ON_TIME',
    'pane_index': 0,
    'count': 6,
    'rate': 0.2,
  }


def test_last_n_keeps_latest_oldest_first_and_pads():
  fn = LastNFn(3)
  events = [(4.0, (40.0,), 100.0), (1.0, (10.0,), 101.0), (3.0, (30.0,), 99.0), (2.0, (20.0,), 102.0)]
  left, right = fn.create_accumulator(), fn.create_accumulator()
  for event in events[:2]:
    left = fn.add_input(left, event)
  for event in events[2:]:
    right = fn.add_input(right, event)
  seq = fn.extract_output(fn.merge_accumulators([left, right]))
  assert seq.values.dtype == np.float32 and seq.values.tolist() == [[20.0], [30.0], [40.0]]
  assert seq.mask.tolist() == [True, True, True] and seq.times.tolist() == [2.0, 3.0, 4.0]
  assert seq.arrival == 102.0  # greatest arrival among the kept events
  short = pad_events([(7.0, (1.0, 2.0)), (5.0, (3.0, 4.0))], 4)
  assert short.values.tolist() == [[3.0, 4.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
  assert short.mask.tolist() == [True, True, False, False] and short.length == 2
  assert short.valid().tolist() == [[3.0, 4.0], [1.0, 2.0]] and short.arrival is None


def test_last_n_equals_the_latest_n_of_everything_however_it_is_combined():
  """One event at a time, a pane's worth at once, or merged from pieces: the
  accumulator always holds the latest n (ties broken by own time, then values)."""
  rng = np.random.default_rng(0)
  for n in (1, 3, 16):
    events = [(float(t), (float(v),), float(a)) for t, v, a in rng.integers(0, 20, size=(60, 3))]
    fn = LastNFn(n)
    one_by_one = fn.create_accumulator()
    for event in events:
      one_by_one = fn.add_input(one_by_one, event)
    at_once = fn.add_inputs(fn.create_accumulator(), events)
    pieces = [fn.add_inputs(fn.create_accumulator(), events[i : i + 7]) for i in range(0, len(events), 7)]
    merged = fn.merge_accumulators(pieces)
    expected = fn.extract_output(sorted(events, key=lambda e: (e[0], e[0], e[1]))[-n:])
    for accumulator in (one_by_one, at_once, merged):
      assert len(accumulator) <= n
      got = fn.extract_output(accumulator)
      assert got.times.tolist() == expected.times.tolist() and got.values.tolist() == expected.values.tolist()


def test_last_n_with_declared_width_on_empty_window():
  seq = LastNFn(2, num_features=3).extract_output(LastNFn(2).create_accumulator())
  assert seq.values.shape == (2, 3) and not seq.mask.any()
  assert seq == Sequence(np.zeros((2, 3), np.float32), np.zeros(2, bool), np.zeros(2), None)


def test_spectrogram_peaks_at_the_signal_frequency():
  rate, freq = 256.0, 32.0
  t = np.arange(512) / rate
  freqs, frames, image = spectrogram(np.sin(2 * np.pi * freq * t), SpectrogramSpec(rate, nperseg=64))
  assert image.dtype == np.float32 and image.shape == (33, len(frames))
  assert freqs[1] - freqs[0] == rate / 64
  assert np.all(freqs[image.argmax(axis=0)] == freq)  # every frame peaks at 32 Hz


def test_place_samples_snaps_jitter_and_counts_gaps():
  samples = [(10.0 + i / 4 + 0.01, float(i)) for i in (3, 0, 1)]  # out of order, jittered
  signal, missing = place_samples(samples, 10.0, 11.0, sample_rate=4)
  assert signal.tolist() == [0.0, 1.0, 0.0, 3.0] and missing == 1


def test_window_spec_validation_and_triggers():
  with pytest.raises(ValueError):
    WindowSpec('sliding', size=10)
  with pytest.raises(ValueError):
    WindowSpec('session')
  with pytest.raises(ValueError):
    WindowSpec('fixed', early_after_secs=1, early_after_count=2)
  assert WindowSpec('fixed', size=10).trigger() is None
  trig = WindowSpec('fixed', size=10, allowed_lateness=5, early_after_count=2).trigger()
  assert trig == tr.AfterWatermark(early=tr.AfterCount(2), late=tr.AfterCount(1))


def test_window_spec_assign_and_expiry():
  spec = WindowSpec('sliding', size=10, period=5, allowed_lateness=3)
  windows = sorted(spec.assign(12.0), key=lambda w: w.start)
  assert windows == [IntervalWindow(5, 15), IntervalWindow(10, 20)]
  assert spec.expiry(windows[0]).micros == 18_000_000
