"""Model refresh while a pipeline runs: RunInference's ModelMetadata side input.

Windows of main input see the ModelMetadata of their window (Beam's own
pattern for this, base_test.test_run_inference_side_input_in_batch, pinned to
the FnApiRunner): default model A, then B, then a broken checkpoint, then A
again named by a file path as WatchFilePattern reports it. The broken
refresh must keep a good model serving (nothing lost) and count the failure.
"""

import math
import os
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, ModelMetadata, RunInference
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, window

from beam_dl.models import checkpoints
from beam_dl.serving.handler import METRICS_NAMESPACE, JaxModelHandler
from tests.models import save_broken_model, save_seeded_model, seeded_variables
from transforms.inference import RunInferenceWithDeadLetters

SPEC = checkpoints.ModelSpec(
  name='small_cnn',
  kwargs={'num_classes': 4, 'features': [4], 'hidden': 8},
  input_shape=(4, 4, 1),
  input_dtype='uint8',
  input_scale=1 / 255,
)
INTERVAL = 10


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """{'a': dir, 'b': dir, 'broken': dir} and {dir: variables}."""
  root = tmp_path_factory.mktemp('refresh')
  dirs, weights = {}, {}
  for name, seed, fmt in (('a', 0, 'orbax'), ('b', 1, 'msgpack')):
    dirs[name], variables = save_seeded_model(root / name, SPEC, seed=seed, fmt=fmt)
    weights[dirs[name]] = variables
  dirs['broken'] = save_broken_model(root / 'broken', SPEC, b'\xc1 truncated upload')
  return dirs, weights


def image(i):
  return np.random.default_rng(i).integers(0, 256, size=(4, 4, 1), dtype=np.uint8)


def served_by(weights):
  """(key, PredictionResult) -> (key, model_dir), checking the logits really
  come from that model's weights."""
  module = SPEC.build()

  def check(kv):
    key, result = kv
    want = module.apply(weights[result.model_id], SPEC.normalize(result.example[None]))[0]
    np.testing.assert_allclose(result.inference, np.asarray(want), atol=1e-5)
    return key, os.path.basename(result.model_id)

  return check


def failures(result):
  found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name('model_load_failures'))[
    'counters'
  ]
  return sum(c.committed for c in found)


class _Emit(beam.DoFn):
  def process(self, grouped):
    yield from grouped[1]


def test_side_input_refresh_survives_a_broken_checkpoint(models):
  dirs, weights = models
  t0 = INTERVAL * math.floor((time.time() - 100) / INTERVAL)  # window-aligned
  side = [
    (t0 + 1, ModelMetadata(model_id='', model_name='default')),
    (t0 + 11, ModelMetadata(model_id=dirs['b'], model_name='b')),
    (t0 + 21, ModelMetadata(model_id=dirs['broken'], model_name='broken')),
    (t0 + 31, ModelMetadata(model_id=os.path.join(dirs['a'], checkpoints.SPEC_FILE), model_name='a_again')),
  ]
  main = [(f'w{w}e{e}', t0 + 10 * w + 2 + e) for w in range(4) for e in range(3)]
  pipeline = TestPipeline('FnApiRunner')
  metadata = (
    pipeline
    | 'Side' >> beam.Create(side)
    | 'SideTimestamps' >> beam.Map(lambda x: window.TimestampedValue(x[1], x[0]))
    | 'SideWindows'
    >> beam.WindowInto(window.FixedWindows(INTERVAL), accumulation_mode=trigger.AccumulationMode.DISCARDING)
    | 'SideKey' >> beam.Map(lambda m: ('k', m))
    | 'SideGroup' >> beam.GroupByKey()
    | 'SideEmit' >> beam.ParDo(_Emit())
  )
  examples = (
    pipeline
    | 'Main' >> beam.Create(main)
    | 'MainTimestamps' >> beam.Map(lambda kt: window.TimestampedValue((kt[0], image(kt[1] - t0)), kt[1]))
    | 'MainWindows' >> beam.WindowInto(window.FixedWindows(INTERVAL))
    | 'MainKey' >> beam.Map(lambda kv: ('k', kv))
    | 'MainGroup' >> beam.GroupByKey()
    | 'MainEmit' >> beam.ParDo(_Emit())
  )
  handler = JaxModelHandler(dirs['a'], max_batch_size=8)
  outputs = examples | RunInferenceWithDeadLetters(handler, model_metadata_pcoll=metadata)
  served = outputs.predictions | beam.Map(served_by(weights))

  def check(actual):
    by_window = {}
    for key, model in actual:
      by_window.setdefault(key[:2], set()).add(model)
    assert sorted(k for k, _ in actual) == sorted(k for k, _ in main), 'every input predicted once'
    assert by_window['w0'] == {'a'} and by_window['w1'] == {'b'} and by_window['w3'] == {'a'}
    assert by_window['w2'] <= {'a', 'b'}  # the broken refresh kept a good model serving

  assert_that(served, check, label='served')
  assert_that(outputs.failed, equal_to([]), label='no_dead_letters')
  result = pipeline.run()
  result.wait_until_finish()
  assert failures(result) >= 1  # once per worker (DoFn instance) that tried it


def test_streaming_refresh_with_test_stream(models):
  """Streaming DirectRunner: the side input advances from B to the broken
  checkpoint; the second batch is still served by B."""
  dirs, weights = models
  options = TestPipeline().get_pipeline_options()
  options.view_as(StandardOptions).streaming = True
  stream = (
    TestStream(output_tags=['side', 'main'])
    .add_elements([window.TimestampedValue(ModelMetadata(dirs['b'], 'b'), 1)], tag='side')
    .add_elements([window.TimestampedValue(('first', image(1)), 5)], tag='main')
    .advance_watermark_to(10, tag='side')
    .advance_watermark_to(10, tag='main')
    .add_elements([window.TimestampedValue(ModelMetadata(dirs['broken'], 'broken'), 11)], tag='side')
    .add_elements([window.TimestampedValue(('second', image(2)), 15)], tag='main')
    .advance_watermark_to_infinity(tag='side')
    .advance_watermark_to_infinity(tag='main')
  )
  with beam.Pipeline(runner='DirectRunner', options=options) as pipeline:
    streams = pipeline | stream
    metadata = streams['side'] | 'SideWindows' >> beam.WindowInto(window.FixedWindows(10))
    served = (
      streams['main']
      | 'MainWindows' >> beam.WindowInto(window.FixedWindows(10))
      | RunInference(KeyedModelHandler(JaxModelHandler(dirs['a'], max_batch_size=4)), model_metadata_pcoll=metadata)
      | beam.Map(served_by(weights))
    )
    assert_that(served, equal_to([('first', 'b'), ('second', 'b')]))


def test_streaming_refresh_with_dead_letters(models):
  """RunInferenceWithDeadLetters in streaming with a ModelMetadata side input
  (TestStream) finishes: the first window is served by B, the second by A,
  and an element of the wrong shape becomes a dead letter (isolated in place
  by the same step, also in streaming with refresh)."""
  dirs, weights = models
  options = TestPipeline().get_pipeline_options()
  options.view_as(StandardOptions).streaming = True
  stream = (
    TestStream(output_tags=['side', 'main'])
    .add_elements([window.TimestampedValue(ModelMetadata(dirs['b'], 'b'), 1)], tag='side')
    .add_elements([window.TimestampedValue(('first', image(1)), 5)], tag='main')
    .add_elements([window.TimestampedValue(('bad', np.zeros((3, 3, 1), np.uint8)), 6)], tag='main')
    .advance_watermark_to(10, tag='side')
    .advance_watermark_to(10, tag='main')
    .add_elements([window.TimestampedValue(ModelMetadata(dirs['a'], 'a'), 11)], tag='side')
    .add_elements([window.TimestampedValue(('second', image(2)), 15)], tag='main')
    .advance_watermark_to_infinity(tag='side')
    .advance_watermark_to_infinity(tag='main')
  )
  with beam.Pipeline(runner='DirectRunner', options=options) as pipeline:
    streams = pipeline | stream
    metadata = streams['side'] | 'SideWindows' >> beam.WindowInto(window.FixedWindows(10))
    outputs = (
      streams['main']
      | 'MainWindows' >> beam.WindowInto(window.FixedWindows(10))
      | RunInferenceWithDeadLetters(JaxModelHandler(dirs['a'], max_batch_size=4), model_metadata_pcoll=metadata)
    )
    served = outputs.predictions | beam.Map(served_by(weights))
    assert_that(served, equal_to([('first', 'b'), ('second', 'a')]), label='served')
    assert_that(
      outputs.failed | beam.Map(lambda r: (r['key'], r['stage'], 'shape' in r['reason'])),
      equal_to([('bad', 'inference', True)]),
      label='dead_letters',
    )


def test_refresh_to_mismatched_variables_keeps_the_last_good_model(models, tmp_path):
  """A model dir whose variables don't fit its spec (another config's
  arrays) is a failed load: the last good model keeps serving, and the
  mismatched one never becomes the last good model."""
  dirs, weights = models
  other = checkpoints.ModelSpec(**{**SPEC.__dict__, 'kwargs': {'num_classes': 4, 'features': [4], 'hidden': 16}})
  mismatched = checkpoints.save(str(tmp_path / 'mismatched'), SPEC, seeded_variables(other), fmt='msgpack')
  handler = JaxModelHandler(dirs['a'], max_batch_size=4)
  assert handler.load_model().model_dir == dirs['a']
  handler.update_model_path(dirs['b'])
  assert handler.load_model().model_dir == dirs['b']
  for _ in range(2):  # the second time it must still fall back to B, not to itself
    handler.update_model_path(os.path.join(mismatched, checkpoints.MSGPACK_FILE))
    served = handler.load_model()
    assert served.model_dir == dirs['b']
    results = handler.run_inference([image(1)], served)
    np.testing.assert_allclose(
      results[0].inference,
      np.asarray(SPEC.build().apply(weights[dirs['b']], SPEC.normalize(image(1)[None]))[0]),
      atol=1e-5,
    )
  assert handler._unreported_load_failures == 0  # reported with the batches above
  with pytest.raises(checkpoints.CheckpointError, match='variables do not match'):
    JaxModelHandler(mismatched).load_model()  # nothing to fall back to: a clear error
