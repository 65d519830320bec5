"""beam_dl.core.lookahead and DecodeImages' decode-ahead: same outputs, order, windows."""

import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from PIL import Image

from beam_dl.core.lookahead import Lookahead
from beam_dl.decoding.images import ImageSpec
from transforms.images import DecodeImages


def _fail_on_three(x):
  if x == 3:
    raise ValueError('three')
  return x * 10


@pytest.mark.parametrize('depth,group', [(0, 1), (1, 1), (4, 1), (100, 1), (1, 3), (4, 3), (100, 4)])
def test_lookahead_keeps_order_and_returns_exceptions(depth, group):
  ahead = Lookahead(_fail_on_three, depth, threads=2, group=group)
  out = []
  for i in range(10):
    out.extend(ahead.submit(i, f'k{i}'))
    assert len(out) >= i + 1 - depth  # at most `depth` outstanding
  out.extend(ahead.drain())
  ahead.close()
  assert [c for c, _ in out] == [f'k{i}' for i in range(10)]
  assert [o for _, o in out if not isinstance(o, Exception)] == [i * 10 for i in range(10) if i != 3]
  assert isinstance(out[3][1], ValueError)


def test_lookahead_bounds_pending_cost():
  ahead = Lookahead(lambda x: x, depth=100, max_cost=10)
  out = []
  for i in range(6):
    out.extend(ahead.submit(i, i, cost=4))
    pending = i + 1 - len(out)
    assert pending * 4 <= 10, pending  # never more than max_cost pending (one item may exceed it alone)
  out.extend(ahead.drain())
  ahead.close()
  assert [c for c, _ in out] == list(range(6))


def test_lookahead_rejects_bad_arguments():
  with pytest.raises(ValueError):
    Lookahead(abs, -1)
  with pytest.raises(ValueError):
    Lookahead(abs, 1, threads=0)
  with pytest.raises(ValueError):
    Lookahead(abs, 1, group=0)


def _png(value):
  buf = io.BytesIO()
  Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


@pytest.mark.parametrize('ahead', [0, 3])
def test_decode_ahead_keeps_windows_and_dead_letters(ahead):
  """Outputs emitted after later inputs (or in finish_bundle) stay in their
  own fixed window; broken inputs are dead letters in theirs."""
  spec = ImageSpec(height=4, width=4, channels=3)
  inputs = [(f'k{i}', b'not an image' if i % 4 == 3 else _png(i), i * 10) for i in range(9)]
  with TestPipeline() as p:
    decoded = (
      p
      | beam.Create(inputs)
      | beam.Map(lambda e: window.TimestampedValue((e[0], e[1]), e[2]))
      | beam.WindowInto(window.FixedWindows(25))
      | DecodeImages(spec, ahead=ahead)
    )
    images = decoded.decoded | 'Pixel' >> beam.Map(
      lambda kv, w=beam.DoFn.WindowParam: (kv[0], int(kv[1][0, 0, 0]), kv[1].shape, int(w.start))
    )
    failed = decoded.failed | 'Key' >> beam.Map(lambda d, w=beam.DoFn.WindowParam: (d['key'], d['stage'], int(w.start)))
    assert_that(
      images, equal_to([(f'k{i}', i, (4, 4, 3), i * 10 // 25 * 25) for i in range(9) if i % 4 != 3]), label='images'
    )
    assert_that(failed, equal_to([(f'k{i}', 'decode', i * 10 // 25 * 25) for i in (3, 7)]), label='failed')
