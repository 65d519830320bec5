"""beam_dl.core.isolate: one batch function, real failures on real elements.

The batch function here parses a batch of JSON texts as one JSON array (one
bad text fails the whole parse, as a bad record fails TensorFlow's batch
parser), and does arithmetic on numpy rows (a row of the wrong width fails
np.stack for the whole batch).
"""

import json

import numpy as np
import pytest

from beam_dl.core.isolate import Failed, any_error, failures, isolate


def parse_as_array(texts):
  """Parses the texts as one JSON array: any bad text fails every one."""
  calls.append(len(texts))
  return json.loads('[' + ','.join(texts) + ']')


calls = []


@pytest.fixture(autouse=True)
def _fresh_calls():
  calls.clear()


def texts(n, bad=()):
  return ['{"x": %d}' % i if i not in bad else '{"x": %d' % i for i in range(n)]


def test_good_batch_is_one_call():
  assert isolate(parse_as_array, texts(8)) == [{'x': i} for i in range(8)]
  assert calls == [8]


@pytest.mark.parametrize('bad', [(0,), (7,), (3, 4), (0, 5, 11), tuple(range(12))])
def test_every_element_accounted_for_once_in_order(bad):
  out = isolate(parse_as_array, texts(12, bad))
  assert len(out) == 12
  for i, outcome in enumerate(out):
    if i in bad:
      assert isinstance(outcome, Failed) and isinstance(outcome.error, json.JSONDecodeError)
    else:
      assert outcome == {'x': i}
  assert failures(out) == len(bad)


def test_one_bad_element_costs_log_n_extra_calls():
  isolate(parse_as_array, texts(64, bad=(37,)))
  # the full batch, then two halves per level down to one element: 1 + 2*6
  assert len(calls) == 13 and calls[0] == 64 and calls.count(1) == 2


def test_split_policy_lets_other_errors_through():
  def stack_rows(rows):
    calls.append(len(rows))
    return np.stack(rows) @ np.array([1.0, 2.0, 3.0])  # a row of another width fails stack or matmul

  rows = [np.arange(3.0), np.arange(3.0) + 1, np.arange(4.0)]
  out = isolate(stack_rows, rows, splits=lambda e: isinstance(e, ValueError))
  assert out[:2] == [8.0, 14.0]
  assert isinstance(out[2], Failed) and 'matmul' in str(out[2].error)
  with pytest.raises(ValueError, match='same shape'):  # not split: propagates from the first call
    isolate(stack_rows, rows, splits=lambda e: isinstance(e, MemoryError))
  assert calls[-1] == 3


def test_raise_alone_reraises_the_lone_error_and_counts_splits():
  sizes = []
  with pytest.raises(json.JSONDecodeError):
    isolate(parse_as_array, texts(5, bad=(3,)), raise_alone=True, on_split=sizes.append)
  assert sizes == [5, 3, 2]  # [0..5) -> [0, 1] parses, [2, 3, 4] -> [2] parses, [3, 4] -> [3] fails alone
  assert calls[-1] == 1


def test_wrong_result_count_is_an_error_of_that_call():
  out = isolate(lambda batch: batch[:-1], [1, 2])
  assert all(isinstance(o, Failed) and 'results for a batch of 1' in str(o.error) for o in out)


def test_failed_keeps_no_traceback_and_empty_batch_is_empty():
  out = isolate(parse_as_array, texts(2, bad=(1,)))
  assert out[1].error.__traceback__ is None
  assert isolate(parse_as_array, []) == [] and calls == [2, 1, 1]  # no call for an empty batch
  assert any_error(ValueError()) and not any_error(KeyboardInterrupt())
