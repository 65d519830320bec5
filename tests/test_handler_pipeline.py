"""JaxModelHandler in real pipelines: Beam's ModelHandler contract, end to end.

Each test runs RunInference (or RunInferenceWithDeadLetters) on the
FnApiRunner with TestPipeline + assert_that; expected outputs come from the
Flax module applied directly. Metrics are read from the PipelineResult.
"""

import os
import shutil

import apache_beam as beam
import jax
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import (
  KeyedModelHandler,
  MaybeKeyedModelHandler,
  RunInference,
)
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_dl.models import checkpoints
from beam_dl.serving.handler import METRICS_NAMESPACE, JaxModelHandler, default_inference_fn
from tests.models import save_seeded_model
from transforms.inference import RunInferenceWithDeadLetters

SPEC = checkpoints.ModelSpec(
  name='small_cnn',
  kwargs={'num_classes': 10, 'features': [8, 16], 'hidden': 32},
  input_shape=(8, 8, 1),
  input_dtype='uint8',
  input_scale=1 / 255,
)
N = 20


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """(model_dir, {key: expected logits}, {key: image}) for N random images."""
  model_dir, variables = save_seeded_model(tmp_path_factory.mktemp('cnn') / 'model', SPEC, fmt='msgpack')
  x = np.random.default_rng(0).integers(0, 256, size=(N, 8, 8, 1), dtype=np.uint8)
  logits = np.asarray(SPEC.build().apply(variables, SPEC.normalize(x)))
  keys = [f'img{i:02d}' for i in range(N)]
  return model_dir, dict(zip(keys, logits)), dict(zip(keys, x))


def close_to(expected: dict, model_id=None):
  """assert_that matcher over (key, PredictionResult): every key once, logits close."""

  def check(actual):
    assert sorted(k for k, _ in actual) == sorted(expected), 'keys differ'
    for key, result in actual:
      np.testing.assert_allclose(result.inference, expected[key], atol=1e-5, err_msg=key)
      if model_id is not None:
        assert result.model_id == model_id

  return check


def counter(result, name):
  found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name))['counters']
  return sum(c.committed for c in found)


def run(pipeline):
  result = pipeline.run()
  result.wait_until_finish()
  return result


def test_run_inference_unchanged_with_metrics(model):
  model_dir, expected, images = model
  by_bytes = {images[k].tobytes(): v for k, v in expected.items()}
  pipeline = TestPipeline('FnApiRunner')
  results = (
    pipeline
    | beam.Create(list(images.values()))
    | RunInference(JaxModelHandler(model_dir, max_batch_size=8))
    | beam.Map(lambda r: (r.example.tobytes(), r))
  )
  assert_that(results, close_to(by_bytes, model_dir))
  result = run(pipeline)
  assert counter(result, 'num_inferences') == N  # Beam's own, under our namespace
  assert counter(result, 'model_loads') == 1
  assert 1 <= counter(result, 'jit_compiles') <= 4  # buckets 1, 2, 4, 8
  assert counter(result, 'input_slots') >= N
  assert counter(result, 'input_slots') - counter(result, 'padded_slots') == N
  dists = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))['distributions']
  assert {d.key.metric.name for d in dists} >= {'padding_percent', 'inference_batch_latency_micro_secs'}


def test_keyed_and_maybe_keyed(model):
  model_dir, expected, images = model
  with TestPipeline('FnApiRunner') as pipeline:
    keyed = pipeline | beam.Create(list(images.items()))
    out1 = keyed | 'Keyed' >> RunInference(KeyedModelHandler(JaxModelHandler(model_dir, max_batch_size=8)))
    out2 = keyed | 'MaybeKeyed' >> RunInference(MaybeKeyedModelHandler(JaxModelHandler(model_dir, max_batch_size=8)))
    unkeyed = (
      pipeline
      | 'Unkeyed' >> beam.Create(list(images.values())[:3])
      | 'MaybeUnkeyed' >> RunInference(MaybeKeyedModelHandler(JaxModelHandler(model_dir, max_batch_size=8)))
      | beam.Map(lambda r: int(np.argmax(r.inference)))
    )
    assert_that(out1, close_to(expected, model_dir), label='keyed')
    assert_that(out2, close_to(expected, model_dir), label='maybe_keyed')
    first3 = [int(np.argmax(v)) for v in list(expected.values())[:3]]
    assert_that(unkeyed, equal_to(first3), label='maybe_unkeyed')


def test_pre_and_post_processing_fns(model):
  model_dir, expected, images = model
  handler = (
    KeyedModelHandler(JaxModelHandler(model_dir, max_batch_size=8))
    .with_preprocess_fn(lambda kv: (kv[0], np.asarray(kv[1], np.uint8).reshape(8, 8, 1)))
    .with_postprocess_fn(lambda kv: (kv[0], int(np.argmax(kv[1].inference))))
  )
  with TestPipeline('FnApiRunner') as pipeline:
    labels = (
      pipeline
      | beam.Create([(k, v.ravel().tolist()) for k, v in images.items()])  # plain lists in
      | RunInference(handler)
    )
    assert_that(labels, equal_to([(k, int(np.argmax(v))) for k, v in expected.items()]))


def _oom_over_four_and_on_poison(model, batch, inference_args):
  """Runs like a device with room for 4 examples, where one example (all
  255s) never fits: raises XLA's real error type with its real status."""
  if len(batch) > 4 or any(int(x.min()) == 255 for x in batch):
    raise jax.errors.JaxRuntimeError(f'RESOURCE_EXHAUSTED: Out of memory allocating batch of {len(batch)}')
  return default_inference_fn(model, batch, inference_args)


def test_dead_letters_isolate_bad_elements_and_oom_splits(model):
  model_dir, expected, images = model
  inputs = list(images.items()) + [
    ('wrong_shape', np.zeros((4, 4, 1), np.uint8)),
    ('poison', np.full((8, 8, 1), 255, np.uint8)),
  ]
  handler = JaxModelHandler(model_dir, max_batch_size=8, min_batch_size=8, inference_fn=_oom_over_four_and_on_poison)
  pipeline = TestPipeline('FnApiRunner')
  outputs = pipeline | beam.Create(inputs) | RunInferenceWithDeadLetters(handler)
  assert_that(outputs.predictions, close_to(expected, model_dir), label='predictions')
  failed = outputs.failed | beam.Map(lambda d: (d['key'], d['stage'], d['reason']))
  assert_that(
    failed,
    equal_to(
      [
        ('wrong_shape', 'inference', 'ValueError: example 0 has shape (4, 4, 1), model expects (8, 8, 1)'),
        ('poison', 'inference', 'JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating batch of 1'),
      ]
    ),
    label='failed',
  )
  result = run(pipeline)
  assert counter(result, 'oom_splits') >= 1


def test_preprocess_failures_are_dead_letters(model):
  model_dir, expected, images = model
  handler = KeyedModelHandler(JaxModelHandler(model_dir, max_batch_size=8)).with_preprocess_fn(
    lambda kv: (kv[0], np.asarray(kv[1], np.uint8).reshape(8, 8, 1))
  )
  with TestPipeline('FnApiRunner') as pipeline:
    outputs = (
      pipeline
      | beam.Create([(k, v.ravel().tolist()) for k, v in images.items()] + [('short', [1, 2, 3])])
      | RunInferenceWithDeadLetters(handler)
    )
    assert_that(outputs.predictions, close_to(expected), label='predictions')
    assert_that(
      outputs.failed | beam.Map(lambda d: (d['key'], d['stage'])), equal_to([('short', 'preprocess')]), label='failed'
    )


def _softmax_with_temperature(model, batch, inference_args):
  logits = model.predict(batch)
  return np.asarray(jax.nn.softmax(logits / inference_args['temperature'], axis=-1))


def test_inference_args_reach_inference_fn(model):
  model_dir, expected, images = model
  handler = KeyedModelHandler(JaxModelHandler(model_dir, max_batch_size=8, inference_fn=_softmax_with_temperature))
  want = {k: np.asarray(jax.nn.softmax(v / 2.0)) for k, v in expected.items()}
  with TestPipeline('FnApiRunner') as pipeline:
    out = pipeline | beam.Create(list(images.items())) | RunInference(handler, inference_args={'temperature': 2.0})
    assert_that(out, close_to(want))


def test_env_vars_and_resource_hints(model, monkeypatch):
  model_dir, expected, images = model
  monkeypatch.delenv('BEAM_DL_HANDLER_TEST', raising=False)
  handler = JaxModelHandler(
    model_dir, max_batch_size=8, env_vars={'BEAM_DL_HANDLER_TEST': 'on'}, resource_hints={'min_ram': '1GB'}
  )
  pipeline = TestPipeline('FnApiRunner')
  out = pipeline | beam.Create(list(images.items())) | RunInference(KeyedModelHandler(handler))
  assert_that(out, close_to(expected))
  proto = pipeline.to_runner_api()
  envs = proto.components.environments
  hinted = {
    t.unique_name
    for t in proto.components.transforms.values()
    if t.environment_id and any('min_ram' in urn for urn in envs[t.environment_id].resource_hints)
  }
  assert any(name.endswith('BeamML_RunInference') for name in hinted), hinted
  run(pipeline)
  assert os.environ['BEAM_DL_HANDLER_TEST'] == 'on'  # set in the (in-process) worker before loading


def test_failed_batches_are_isolated_inside_the_one_inference_step(model, tmp_path):
  """A batch with a bad element is split in place by the RunInference DoFn:
  one inference step in the graph, one model load (Beam's Shared is the only
  cache), the good elements predicted once and the bad one dead-lettered."""
  _, expected, images = model
  model_dir = str(tmp_path / 'copy')
  shutil.copytree(model[0], model_dir)  # a directory no earlier test has loaded
  inputs = list(images.items()) + [('wrong_shape', np.zeros((4, 4, 1), np.uint8))]
  pipeline = TestPipeline('FnApiRunner')
  outputs = (
    pipeline
    | beam.Create(inputs)
    | RunInferenceWithDeadLetters(JaxModelHandler(model_dir, max_batch_size=8, min_batch_size=8))
  )
  assert_that(outputs.predictions, close_to(expected, model_dir), label='predictions')
  assert_that(
    outputs.failed | beam.Map(lambda d: (d['key'], d['stage'])),
    equal_to([('wrong_shape', 'inference')]),
    label='failed',
  )
  steps = [t.unique_name for t in pipeline.to_runner_api().components.transforms.values()]
  assert sum(name.endswith('/BeamML_RunInference') for name in steps) == 1, steps
  result = run(pipeline)
  assert counter(result, 'model_loads') == 1


_batch_sizes = []


def _recording(model, batch, inference_args):
  _batch_sizes.append(len(batch))
  return default_inference_fn(model, batch, inference_args)


def test_batching_knobs_pass_through(model):
  model_dir, expected, images = model
  _batch_sizes.clear()
  handler = JaxModelHandler(model_dir, max_batch_size=4, min_batch_size=2, inference_fn=_recording)
  with TestPipeline('FnApiRunner') as pipeline:
    out = pipeline | beam.Create(list(images.items())) | RunInference(KeyedModelHandler(handler))
    assert_that(out, close_to(expected))
  assert sum(_batch_sizes) == N and max(_batch_sizes) <= 4


RNN_SPEC = checkpoints.ModelSpec(
  name='rnn',
  kwargs={'cell': 'lstm', 'hidden_size': 8, 'num_outputs': 2, 'pooling': 'last'},
  input_shape=(None, 3),
  task='sequence_classification',
)


def test_rnn_with_length_aware_batching(tmp_path):
  model_dir, variables = save_seeded_model(tmp_path / 'rnn', RNN_SPEC, seed=1, fmt='msgpack')
  rng = np.random.default_rng(0)
  lengths = [3, 6, 3, 6, 20, 30, 20, 30, 6, 20]
  seqs = {f's{i}': rng.normal(size=(n, 3)).astype(np.float32) for i, n in enumerate(lengths)}
  apply = jax.jit(RNN_SPEC.build().apply)
  expected = {k: np.asarray(apply(variables, s[None], np.ones((1, len(s)), bool)))[0] for k, s in seqs.items()}
  handler = JaxModelHandler(
    model_dir,
    max_batch_size=4,
    length_buckets=(8, 32),
    batch_length_fn=len,
    batch_bucket_boundaries=[8],
    max_batch_duration_secs=1,
  )
  pipeline = TestPipeline('FnApiRunner')
  out = pipeline | beam.Create(list(seqs.items())) | RunInference(KeyedModelHandler(handler))
  assert_that(out, close_to(expected, model_dir))
  result = run(pipeline)
  # length-bucketed batches: short sequences never pad to 32, so slots stay low
  assert counter(result, 'jit_compiles') <= 2 * 3  # 2 length buckets x batch buckets 1, 2, 4
  assert counter(result, 'input_slots') - counter(result, 'padded_slots') == sum(lengths)


@pytest.mark.timeout(120)
def test_large_model_shared_across_processes(model):
  """large_model=True: the model lives in one multi_process_shared server
  process; workers call it through a proxy (stats()/model_id() included)."""
  model_dir, expected, images = model
  handler = KeyedModelHandler(JaxModelHandler(model_dir, max_batch_size=8, large_model=True))
  assert handler.share_model_across_processes()
  with TestPipeline('FnApiRunner') as pipeline:
    out = pipeline | beam.Create(list(images.items())) | RunInference(handler, model_identifier='large-digits')
    assert_that(out, close_to(expected, model_dir))


def test_error_handler_and_threshold_on_inference(model):
  """Two wrong-shaped inputs among N: with error_threshold above their share
  the job succeeds and Beam's ErrorHandler gets both dead letters; below it,
  the job fails with the count."""
  from apache_beam.transforms.error_handling import ErrorHandler

  model_dir, expected, images = model
  inputs = list(images.items()) + [(f'bad{i}', np.zeros((4, 4, 1), np.uint8)) for i in range(2)]
  handler = JaxModelHandler(model_dir, max_batch_size=8)
  pipeline = TestPipeline('FnApiRunner')
  with ErrorHandler(beam.Map(lambda d: (d['key'], d['stage']))) as errors:
    outputs = (
      pipeline
      | beam.Create(inputs)
      | RunInferenceWithDeadLetters(handler, error_threshold=0.1).with_error_handler(errors)
    )
  assert_that(outputs.predictions, close_to(expected, model_dir), label='predictions')
  assert_that(errors.output(), equal_to([('bad0', 'inference'), ('bad1', 'inference')]), label='handled')
  run(pipeline)  # 2 of 22 = 9.1% <= 10%

  pipeline = TestPipeline('FnApiRunner')
  _ = pipeline | beam.Create(inputs) | RunInferenceWithDeadLetters(handler, error_threshold=0.05)
  with pytest.raises(Exception, match=r'2 of 22 inputs failed \(9\.1%\), above the error threshold of 5\.0%'):
    run(pipeline)
