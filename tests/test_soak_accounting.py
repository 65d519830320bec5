"""The soak benchmark's accounting (benchmarks/soak_streaming.py): what it calls missing and duplicated."""

from benchmarks.soak_streaming import FLUSH_KEY, account


def _final(key, start, length, pane='ON_TIME', index=0):
  return {'key': key, 'window_start': start, 'pane': pane, 'length': length, 'pane_index': index}


def test_every_event_in_its_final_pane_or_a_dead_letter():
  sent = [('k0', 0.5), ('k0', 1.5), ('k1', 2.1), ('k1', 3.9)]
  scores = [
    {'key': 'k0', 'window_start': 0.0, 'pane': 'EARLY', 'length': 1},  # early panes count for nothing
    _final('k0', 0.0, 2),
    _final('k1', 2.0, 1),
    _final(FLUSH_KEY, 4.0, 5),  # the watermark's own events
  ]
  failed = [{'key': 'k1', 'stage': 'late', 'window_start': 2.0}]
  assert account(sent, scores, failed, 2.0) == {
    'events': 4,
    'windows': 2,
    'missing': 0,
    'duplicate_panes': 0,
    'dead_letters': 1,
  }


def test_a_lost_event_and_a_repeated_final_pane_are_counted():
  sent = [('k0', 0.5), ('k0', 1.5), ('k1', 2.1)]
  scores = [_final('k0', 0.0, 1), _final('k0', 0.0, 1)]  # one event short, twice; k1's window never came
  result = account(sent, scores, [], 2.0)
  assert result['missing'] == 2 and result['duplicate_panes'] == 1


def test_a_late_pane_completes_its_window():
  """With allowed lateness, an event after the watermark lands in a LATE pane that holds the
  whole window (panes accumulate): the window is complete once that pane is out."""
  sent = [('k0', 0.5), ('k0', 1.5), ('k0', 1.9)]
  on_time_only = [_final('k0', 0.0, 2, 'ON_TIME', 3)]
  assert account(sent, on_time_only, [], 2.0)['missing'] == 1
  with_late = [*on_time_only, _final('k0', 0.0, 3, 'LATE', 4), _final('k0', 0.0, 3, 'LATE', 4)]
  assert account(sent, with_late, [], 2.0) == {
    'events': 3,
    'windows': 1,
    'missing': 0,
    'duplicate_panes': 1,
    'dead_letters': 0,
  }
