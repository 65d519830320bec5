"""beam_fixes.state_cache_sizing: Beam's state-cache weights, without the per-call module walk."""

import sys

import pytest
from apache_beam.runners.worker import statecache
from apache_beam.utils.timestamp import Timestamp

from beam_dl.beam_fixes import state_cache_sizing
from beam_dl.features.aggregates import WindowStats


class _Walked(list):
  """A module-like entry in sys.modules that records each `vars()` of it."""

  calls = 0

  @property
  def __dict__(self):
    _Walked.calls += 1
    return {}


VALUES = [
  (None, 1_000_000, frozenset({1, 2, 3})),  # the late-data gate's state cell
  [b'x' * 1000, b'y' * 10],
  WindowStats().add(1.0, (1.0, 2.0)),
  {'key': 'a', 'times': [Timestamp(micros=5), Timestamp(micros=7)], 'values': list(range(100))},
]


@pytest.mark.parametrize('value', VALUES, ids=['gate-cell', 'bytes', 'window-stats', 'record'])
def test_weights_are_beams(value):
  assert state_cache_sizing.state_cache_deep_size(value) == state_cache_sizing.BEAM_DEEP_SIZE(value) > 0


def test_installed_on_import_and_no_module_listing_per_call(monkeypatch):
  assert state_cache_sizing.apply() and statecache.get_deep_size is state_cache_sizing.state_cache_deep_size
  monkeypatch.setitem(sys.modules, '_beam_dl_walked', _Walked())
  _Walked.calls = 0
  state_cache_sizing.BEAM_DEEP_SIZE(VALUES[0])
  assert _Walked.calls == 1  # Beam's own: every call lists every module's globals
  state_cache_sizing.state_cache_deep_size(VALUES[0])
  assert _Walked.calls == 1


def test_state_cache_put_weighs_with_the_fix():
  cache = statecache.StateCache(1 << 20)
  cache.put('k', VALUES[1])
  assert cache.size() == 1 and cache.peek('k') == VALUES[1]
