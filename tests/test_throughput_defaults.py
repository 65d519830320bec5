"""Defaults behind the flagship's throughput and flat memory (issues 15, 18)."""

import pickle

from beam_dl.operations.progress import CountProgressFn
from beam_dl.serving.handler import JaxModelHandler, full_batches_by_default


def test_full_batches_unless_told_otherwise():
  assert full_batches_by_default(None, 128, None) == 128
  assert full_batches_by_default(4, 128, None) == 4
  assert full_batches_by_default(None, 128, 5) is None  # streaming latency bound: Beam's own default
  kwargs = JaxModelHandler('unused-dir', max_batch_size=64).batch_elements_kwargs()
  assert kwargs['min_batch_size'] == kwargs['max_batch_size'] == 64


def test_count_progress_passes_elements_through_and_logs(capsys):
  fn = CountProgressFn('read', every_secs=0)
  assert [fn(x) for x in 'abc'] == ['a', 'b', 'c']
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 3 and lines[-1].startswith('read[pid ') and ': 3 elements' in lines[-1]
  copy = pickle.loads(pickle.dumps(fn))  # a fresh count per worker copy
  copy('d')
  assert ': 1 elements' in capsys.readouterr().err
