"""The dispatch-ahead inference step: batch k dispatched before batch k-1 is
read and emitted (transforms.inference._DispatchAheadDoFn,
beam_dl.serving.handler.deferred_reads).

What must hold: the same outputs as Beam's own step on real images; every
input once, in a prediction or a dead letter; a batch whose outputs fail only
when read (after the next batch was dispatched) dead-letters exactly its own
bad elements, never the next batch's; each output keeps its own batch's
window; a streaming bundle ends with nothing held.
"""

import dataclasses
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window

from beam_dl.decoding.images import ImageSpec, decode_image
from beam_dl.serving import handler as handler_lib
from beam_dl.serving.handler import METRICS_NAMESPACE, JaxModelHandler, LoadedModel, deferred_reads
from tests.imaging import digits_uint8, encode, truncated_jpeg
from transforms import ClassifyImages
from transforms.inference import RunInferenceWithDeadLetters

GRAY = ImageSpec(8, 8, channels=1)
BATCH = 8


class _LateFailingModel(LoadedModel):
  """The served model, except that a batch holding an all-white example
  fails when its outputs are read, as a forward pass that hits a runtime
  error after dispatch does (JAX reports it at the read, e.g. an XLA
  callback's error). Outside a `deferred_reads` block: at once, in predict.

  (A real late error is not reproducible on CPU: whether PJRT runs a small
  program inline, failing at dispatch, or asynchronously depends on input
  transfer timing.)"""

  def predict_counted(self, examples):
    outputs, counts = super().predict_counted(examples)
    if any((np.asarray(e) == 255).all() for e in examples):

      def fail():
        raise RuntimeError('INTERNAL: all-white example')

      if not handler_lib._defer(fail):  # pylint: disable=protected-access
        fail()
    return outputs, counts


def _handler_serving(model_class: type) -> type:
  """A JaxModelHandler class whose loaded model is a `model_class` (a
  LoadedModel subclass) over the loaded model's own fields."""

  class _Handler(JaxModelHandler):
    def _load_uncached(self, model_dir):
      model = super()._load_uncached(model_dir)
      return model_class(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})

  return _Handler


_LateFailingHandler = _handler_serving(_LateFailingModel)


@pytest.fixture(scope='module')
def digits():
  """(key, uint8 [8, 8, 1]) for 44 real digits: 5.5 batches of 8."""
  images, _ = digits_uint8()
  return [(f'd{i:03d}', images[i][..., None]) for i in range(44)]


def counter(result, name):
  found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name))['counters']
  return sum(c.committed for c in found)


def test_deferred_reads_fill_outputs_only_when_read(digits_model_dir, digits):
  model = JaxModelHandler(digits_model_dir, max_batch_size=BATCH).load_model()
  examples = [x for _, x in digits[:20]]  # three chunks: 8, 8, 4
  eager = model.predict(examples)
  with deferred_reads() as reads:
    deferred = model.predict(examples)
    with deferred_reads(enabled=False) as none:
      inner = model.predict(examples)  # a custom inference_fn's block: read at once
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(model.predict(examples)))
    thread.start()
    thread.join()
  assert none is None and len(reads) == 1  # only this thread's, only the enabled block's
  np.testing.assert_allclose(inner, eager, atol=1e-6)
  np.testing.assert_allclose(elsewhere[0], eager, atol=1e-6)
  reads[0]()
  np.testing.assert_allclose(deferred, eager, atol=1e-6)


def test_outputs_equal_beams_step_on_real_images(digits_model_dir):
  images, _ = digits_uint8()
  inputs = {
    f'{i:03d}.{"png" if i % 2 else "jpg"}': encode(images[i], 'PNG' if i % 2 else 'JPEG', quality=95) for i in range(60)
  }
  inputs['bad.jpg'] = truncated_jpeg()
  model = JaxModelHandler(digits_model_dir).load_model()
  good = sorted(k for k in inputs if k != 'bad.jpg')
  logits = model.predict([decode_image(inputs[k], GRAY) for k in good])
  expected = [(k, int(np.argmax(v))) for k, v in zip(good, logits)]

  def labels(outputs, name):
    return outputs.predictions | f'{name}Labels' >> beam.Map(lambda r: (r['key'], r['label']))

  def failed(outputs, name):
    return outputs.failed | f'{name}Failed' >> beam.Map(lambda d: (d['key'], d['stage']))

  with TestPipeline('FnApiRunner') as p:
    encoded = p | beam.Create(sorted(inputs.items()))
    ahead = encoded | 'Ahead' >> ClassifyImages(digits_model_dir, max_batch_size=BATCH)
    plain = encoded | 'Plain' >> ClassifyImages(digits_model_dir, max_batch_size=BATCH, dispatch_ahead=False)
    assert_that(labels(ahead, 'Ahead'), equal_to(expected), label='ahead')
    assert_that(labels(plain, 'Plain'), equal_to(expected), label='plain')
    assert_that(failed(ahead, 'Ahead'), equal_to([('bad.jpg', 'decode')]), label='ahead_failed')
    assert_that(failed(plain, 'Plain'), equal_to([('bad.jpg', 'decode')]), label='plain_failed')
    scores = (
      (ahead.predictions, plain.predictions)
      | 'Both' >> beam.Flatten()
      | beam.Map(lambda r: (r['key'], tuple(r['scores'])))
      | beam.GroupByKey()
      | beam.MapTuple(lambda k, s: (k, len(s), len(set(s))))
    )
    assert_that(scores, equal_to([(k, 2, 1) for k in good]), label='same_scores')


class _SlowToFinishModel(LoadedModel):
  """The served model, except that each batch's outputs are there only
  READY_AFTER_S after its dispatch, as a long forward pass's are: a
  deferred read waits until then; outside `deferred_reads`, predict does."""

  READY_AFTER_S = 0.05

  def predict_counted(self, examples):
    ready_at = time.perf_counter() + self.READY_AFTER_S
    outputs, counts = super().predict_counted(examples)

    def wait():
      time.sleep(max(0.0, ready_at - time.perf_counter()))

    if not handler_lib._defer(wait):  # pylint: disable=protected-access
      wait()
    return outputs, counts


_SlowToFinishHandler = _handler_serving(_SlowToFinishModel)


@pytest.mark.parametrize('dispatch_ahead', [True, False])
def test_batch_latency_metric_runs_to_the_read_not_the_dispatch(digits_model_dir, digits, dispatch_ahead):
  """Beam's `inference_batch_latency_micro_secs` is the time a batch's
  outputs took; dispatched ahead, the dispatch alone returns in ~1 ms."""
  handler = _SlowToFinishHandler(digits_model_dir, max_batch_size=BATCH)
  with TestPipeline('FnApiRunner') as p:
    outputs = p | beam.Create(digits) | RunInferenceWithDeadLetters(handler, dispatch_ahead=dispatch_ahead)
    assert_that(outputs.predictions | beam.Keys(), equal_to([k for k, _ in digits]))
  latency = p.result.metrics().query(MetricsFilter().with_name('inference_batch_latency_micro_secs'))
  (dist,) = latency['distributions']
  assert dist.committed.count == 6  # 44 examples in batches of 8: every batch counted once
  assert dist.committed.min >= 1e6 * _SlowToFinishModel.READY_AFTER_S, dist.committed


def _poisoned(digits):
  """The digits with one all-white example in the middle of the third batch."""
  white = ('white', np.full((8, 8, 1), 255, np.uint8))
  return digits[:20] + [white] + digits[20:]


@pytest.mark.parametrize('isolate', [True, False])
def test_a_batch_that_fails_when_read_dead_letters_its_own_elements(digits_model_dir, digits, isolate):
  inputs = _poisoned(digits)
  model = JaxModelHandler(digits_model_dir).load_model()
  clean = dict(zip([k for k, _ in digits], model.predict([x for _, x in digits])))
  handler = _LateFailingHandler(digits_model_dir, max_batch_size=BATCH)
  p = TestPipeline('FnApiRunner')
  outputs = p | beam.Create(inputs) | RunInferenceWithDeadLetters(handler, isolate_elements=isolate)
  predicted = outputs.predictions | 'Keys' >> beam.MapTuple(lambda key, result: key)
  failed = outputs.failed | beam.Map(
    lambda d: (d['key'], d['stage'], d['reason'] == 'RuntimeError: INTERNAL: all-white example')
  )

  def logits_match(actual):
    for key, result in actual:
      np.testing.assert_allclose(result.inference, clean[key], atol=1e-5, err_msg=key)

  assert_that(outputs.predictions, logits_match, label='logits')
  if isolate:
    assert_that(predicted, equal_to([k for k, _ in digits]), label='predicted')
    assert_that(failed, equal_to([('white', 'inference', True)]), label='failed')
  else:  # the poisoned batch fails whole; no other batch's element with it
    every_key = [k for k, _ in inputs]

    def one_batch_failed(actual):
      keys = [k for k, _, _ in actual]
      assert 'white' in keys and 1 < len(keys) <= BATCH, keys
      assert all(stage == 'inference' and poisoned for _, stage, poisoned in actual), actual

    assert_that(failed, one_batch_failed, label='failed')
    every = (predicted, failed | beam.MapTuple(lambda k, *_: k)) | beam.Flatten()
    assert_that(every, equal_to(every_key), label='every_input_once')
  result = p.run()
  result.wait_until_finish()
  assert counter(result, 'late_read_failures') == 1  # found at the read, after the next batch's dispatch


def _window_start(element, w=beam.DoFn.WindowParam):
  key, _ = element
  return key, int(w.start)


def test_outputs_keep_their_own_batch_window(digits_model_dir, digits):
  """Batch: one bundle, elements of three 10-second windows interleaved, so
  consecutive batches (of 4, formed per window) belong to different windows
  and a held batch emitted in the next batch's window would be counted
  there."""
  events = [window.TimestampedValue(kv, 10 * (i % 3) + i // 3) for i, kv in enumerate(digits[:30])]
  expected = [(k, 10 * (i % 3)) for i, (k, _) in enumerate(digits[:30])]
  handler = JaxModelHandler(digits_model_dir, max_batch_size=4)
  with TestPipeline('FnApiRunner') as p:
    keyed = p | beam.Create(events) | beam.WindowInto(window.FixedWindows(10))
    outputs = keyed | RunInferenceWithDeadLetters(handler)
    assert_that(outputs.predictions | beam.Map(_window_start), equal_to(expected), label='windows')
    assert_that(outputs.failed, equal_to([]), label='failed')


def test_streaming_bundles_end_with_nothing_held(digits_model_dir, digits):
  """Streaming: each TestStream event is its own bundle; batches of 4 in
  10-second windows. A batch held past its bundle would be lost (nothing
  else flushes it) or emitted late into another bundle's window."""
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  stream = TestStream()
  expected = []
  for w in range(3):
    events = [window.TimestampedValue(kv, 10 * w + i % 10) for i, kv in enumerate(digits[12 * w : 12 * w + 10])]
    stream = stream.add_elements(events).advance_watermark_to(10 * w + 10)
    expected += [(k, 10 * w) for k, _ in digits[12 * w : 12 * w + 10]]
  stream = stream.advance_watermark_to_infinity()
  handler = JaxModelHandler(digits_model_dir, max_batch_size=4)
  with TestPipeline(options=options) as p:
    keyed = p | stream | beam.WindowInto(window.FixedWindows(10))
    outputs = keyed | RunInferenceWithDeadLetters(handler)
    assert_that(outputs.predictions | beam.Map(_window_start), equal_to(expected), label='windows')
    assert_that(outputs.failed, equal_to([]), label='failed')


class _LabelUnlessThirteen:
  """A post-processing fn: (key, result) -> (key, label), raising for d013."""

  def __call__(self, keyed_result):
    key, result = keyed_result
    if key == 'd013':
      raise ValueError(f'cannot label {key}')
    return key, int(np.argmax(result.inference))


@pytest.mark.parametrize('dispatch_ahead', [True, False])
def test_post_processing_fns_run_per_element_with_their_own_dead_letters(digits_model_dir, digits, dispatch_ahead):
  """The dispatch-ahead step runs the handler's post-processing fns itself
  (no Beam step per fn): each fn in order on each output; an element whose
  fn raises is one 'postprocess' dead letter with the fn's error, its
  batch's other elements go on. Same as Beam's step."""
  model = JaxModelHandler(digits_model_dir).load_model()
  labels = dict(zip([k for k, _ in digits], np.argmax(model.predict([x for _, x in digits]), axis=-1).tolist()))
  handler = (
    KeyedModelHandler(JaxModelHandler(digits_model_dir, max_batch_size=BATCH))
    .with_postprocess_fn(_LabelUnlessThirteen())
    .with_postprocess_fn(lambda key_label: (key_label[0], key_label[1] + 100))
  )
  with TestPipeline('FnApiRunner') as p:
    keyed = p | beam.Create(digits)
    outputs = keyed | RunInferenceWithDeadLetters(handler, dispatch_ahead=dispatch_ahead)
    expected = [(k, label + 100) for k, label in labels.items() if k != 'd013']
    assert_that(outputs.predictions, equal_to(expected), label='labels')
    failed = outputs.failed | beam.Map(lambda d: (d['key'], d['stage'], d['reason']))
    assert_that(failed, equal_to([('d013', 'postprocess', 'ValueError: cannot label d013')]), label='failed')


def test_pipeline_flag_turns_it_off():
  from beam_dl.cli.options import InferenceOptions

  assert PipelineOptions([]).view_as(InferenceOptions).dispatch_ahead is True
  assert PipelineOptions(['--dispatch_ahead=false']).view_as(InferenceOptions).dispatch_ahead is False
  assert PipelineOptions(['--dispatch_ahead']).view_as(InferenceOptions).dispatch_ahead is True
