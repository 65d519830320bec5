"""Watched-directory streaming on the DirectRunner: files that land while the pipeline runs.

Regression test: a second file for keys already seen in the
first one went to `late` (every one of its events) because the late-data
gate's event-time timers fired as soon as the first file was read. Here the
first file is there at start, the second is written by a thread a few polls
after the pipeline has read the first (its access time moves), and the watch
stops by itself (`--stop_after_secs`). With timestamps from the watch (poll time),
no event can be behind the watermark: every one must be scored, none late.
"""

import json
import os
import threading
import time

import pytest

from beam_dl.formats.jsonl import read_jsonl
from pipelines import score_sequences

KEYS = ('a', 'b')
PER_FILE = 4
ARRIVAL_GAP_S = 3.0  # six polls: the first file's events have gone through the late-data gate


def _write_events(path, file_index, keys):
  """Events t = 1000 + 10*file + step for each key, plus a malformed line; renamed in atomically."""
  tmp = f'{path}.part'
  with open(tmp, 'w', encoding='utf-8') as f:
    for key in keys:
      for step in range(PER_FILE):
        f.write(
          json.dumps({'key': key, 'time': 1000.0 + 10 * file_index + step, 'co2': 330.0 + file_index + step / 4}) + '\n'
        )
    f.write('{"key": "a", "time": \n')
  os.rename(tmp, path)


def _read_back(path, deadline_s=60.0):
  """Waits (bounded) until the pipeline has opened `path`: its access time passes its mtime."""
  deadline = time.monotonic() + deadline_s
  while time.monotonic() < deadline:
    st = os.stat(path)
    if st.st_atime_ns > st.st_mtime_ns:
      return True
    time.sleep(0.05)
  return False


@pytest.mark.slow
def test_second_file_for_known_keys_is_scored_not_late(tmp_path, co2_lstm_dir):
  model_dir = co2_lstm_dir
  window_flags = ['--window', 'sliding', '--window_size', '7257600', '--window_period', '604800']  # the docs' CO2 flags
  watched = tmp_path / 'watch'
  watched.mkdir()
  first, second = str(watched / 'e0.jsonl'), str(watched / 'e1.jsonl')
  _write_events(first, 0, KEYS)
  opened = {}

  def land_second_file():
    opened['first'] = _read_back(first)
    time.sleep(ARRIVAL_GAP_S)  # the scenario: the next file lands a while after the first was read
    _write_events(second, 1, ('a', 'c'))  # 'a' is known from the first file, 'c' is new

  writer = threading.Thread(target=land_second_file)
  writer.start()
  out = str(tmp_path / 'out' / 'scores')
  result = score_sequences.run(
    [
      '--streaming',
      '--input',
      str(watched / '*.jsonl'),
      '--model_dir',
      model_dir,
      '--output',
      out,
      '--event_value_fields',
      'co2',
      '--seq_len',
      '16',
      '--stop_after_secs',
      '30',
      '--poll_interval_secs',
      '0.5',
      '--write_frequency_secs',
      '2',
      *window_flags,
    ]
  )
  writer.join()
  assert opened['first'], 'the pipeline never read the first file'
  scores, failed = read_jsonl(f'{out}-2*.jsonl'), read_jsonl(f'{out}_failed-*.jsonl')
  assert not [f for f in failed if f['stage'] == 'late'], failed
  assert sorted(f['stage'] for f in failed) == ['parse_event', 'parse_event']
  want = {'a': 2 * PER_FILE, 'b': PER_FILE, 'c': PER_FILE}  # events per key, both files
  final = [s for s in scores if s['pane'] == 'ON_TIME']
  windows_per_event = 12  # 12-week windows sliding by a week
  for key, n in want.items():
    panes = [s for s in final if s['key'] == key]
    # the watch stamps a file's events with its poll time: each key's events share its windows
    assert len(panes) == windows_per_event, (key, panes)
    assert all(p['length'] == n for p in panes), (key, [p['length'] for p in panes])
  # one EARLY pane per key and window each time new events for it arrived; every pane is scored
  early = [s for s in scores if s['pane'] == 'EARLY']
  assert {s['key'] for s in early} == set(want)
  assert max(s['length'] for s in early if s['key'] == 'a') == 2 * PER_FILE
  summary = score_sequences.latency_summary(result)
  assert summary['files_matched'] == 2 and summary['scored'] == len(scores)
