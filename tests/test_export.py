"""jax2tf SavedModel export: same predictions as the JAX model, in TF and in Beam."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from beam_dl.models import checkpoints
from beam_dl.serving import savedmodel_export as export
from beam_dl.serving import savedmodel_handler
from pipelines import demo, export_savedmodel
from tests.models import save_seeded_model


@pytest.fixture(scope='module')
def exported(digits_model_dir, tmp_path_factory):
  export_dir = str(tmp_path_factory.mktemp('export') / 'saved_model')
  worst = export_savedmodel.main([f'--model_dir={digits_model_dir}', f'--export_dir={export_dir}'])
  assert worst < 1e-4
  _, x_test, _, y_test = demo.digit_images()
  return dict(model_dir=digits_model_dir, export_dir=export_dir, x=x_test[..., None], y=y_test)


def jax_outputs(model_dir, x):
  import jax

  spec, variables = checkpoints.load(model_dir)
  return np.asarray(jax.jit(export.jax_predict_fn(spec))(variables, x))


def test_saved_model_matches_jax_on_held_out_digits(exported):
  import tensorflow as tf

  x, model_dir = exported['x'], exported['model_dir']
  want = jax_outputs(model_dir, x)
  assert (want.argmax(-1) == exported['y']).mean() > 0.85  # a real, trained model
  loaded = tf.saved_model.load(exported['export_dir'])
  for n in (1, 37, len(x)):  # polymorphic batch: any size, one SavedModel
    got = loaded.signatures['serving_default'](inputs=tf.constant(x[:n]))['outputs'].numpy()
    assert got.shape == (n, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, want[:n], rtol=1e-5, atol=1e-5)
  assert export.compare(model_dir, exported['export_dir'], (x[:16],)) < 1e-5
  assert loaded(tf.constant(x[:2])).shape == (2, 10)


def _serve_in_pipeline(handler, x, want):
  """RunInference over `x` with `handler` gives `want`, row for row."""
  from apache_beam.ml.inference.base import KeyedModelHandler

  def matches(results):
    results = sorted(results, key=lambda r: r[0])
    assert [key for key, _ in results] == list(range(len(x)))
    np.testing.assert_allclose(np.stack([logits for _, logits in results]), want, rtol=1e-5, atol=1e-5)

  with TestPipeline(runner='FnApiRunner') as p:
    results = (
      p
      | beam.Create([(str(i), image) for i, image in enumerate(x)])
      | RunInference(KeyedModelHandler(handler))
      | beam.MapTuple(lambda key, result: (int(key), np.asarray(result.inference)))
    )
    assert_that(results, matches)


def test_saved_model_serves_in_beam_run_inference(exported):
  x = exported['x'][:40]
  handler = savedmodel_handler.SavedModelHandler(exported['export_dir'], max_batch_size=16)
  _serve_in_pipeline(handler, x, jax_outputs(exported['model_dir'], x))


def test_saved_model_serves_in_beams_tf_handler(exported):
  try:
    import tensorflow_hub  # noqa: F401  (Beam's TF inference module imports it)
  except ImportError as e:  # includes a setuptools without pkg_resources
    pytest.skip(f'tensorflow_hub not importable: {e}')
  x = exported['x'][:40]
  handler = savedmodel_handler.tf_model_handler(exported['export_dir'], max_batch_size=16)
  _serve_in_pipeline(handler, x, jax_outputs(exported['model_dir'], x))


def test_polymorphic_shapes_and_refusals():
  image = checkpoints.ModelSpec('small_cnn', input_shape=(8, 8, 1))
  sequence = checkpoints.ModelSpec('rnn', input_shape=(None, 3))
  assert export.polymorphic_shapes(image) == ['(b, 8, 8, 1)']
  assert export.polymorphic_shapes(sequence) == ['(b, t, 3)', '(b, t)']
  x, mask = export.example_inputs(sequence, batch_size=3)
  assert x.shape[::2] == (3, 3) and mask.shape == x.shape[:2] and mask[:, 0].all()
  with pytest.raises(checkpoints.CheckpointError):
    export.export_saved_model('/nonexistent/model', '/tmp/never')


def test_sequence_model_exports_with_polymorphic_batch_and_length(tmp_path):
  """A GRU sequence classifier: any batch, any length, padded steps ignored."""
  spec = checkpoints.ModelSpec(
    name='rnn',
    kwargs={'cell': 'gru', 'hidden_size': 8, 'num_outputs': 3, 'pooling': 'mean'},
    input_shape=(None, 2),
    task='sequence_classification',
  )
  model_dir, _ = save_seeded_model(tmp_path / 'rnn', spec, fmt='msgpack')
  export_dir = export.export_saved_model(model_dir, str(tmp_path / 'rnn_saved_model'))
  for n in (1, 5):
    x, mask = export.example_inputs(spec, batch_size=n, seed=n)
    assert export.compare(model_dir, export_dir, (x, mask)) < 1e-5
    padded = (np.concatenate([x, np.ones_like(x)], 1), np.concatenate([mask, np.zeros_like(mask)], 1))
    assert export.compare(model_dir, export_dir, padded) < 1e-5
