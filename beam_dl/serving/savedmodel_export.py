"""Export a beam_dl Flax model directory to a TF SavedModel with jax2tf.

    from beam_dl.serving import savedmodel_export as export
    export.export_saved_model('model', 'saved_model')
    # or: python -m pipelines.export_savedmodel --model_dir model --export_dir saved_model

The SavedModel's `serving_default` signature takes the model's fed input
(`spec.input_dtype`, e.g. uint8 images, with the spec's input scaling applied
inside, exactly as `JaxModelHandler` does) with a polymorphic batch dimension
(and, for sequence models, a polymorphic length plus a bool `mask`) and returns
{'outputs': float32 [batch, num_outputs]}. The Flax parameters are TF variables
(not constants folded into the graph) and the computation is the model's own
StableHLO (jax2tf native serialization), so TF Serving, tfx-bsl's RunInference
and Beam's `TFModelHandlerTensor` serve the very function JAX runs
(`beam_dl.serving.savedmodel_handler` holds the RunInference handlers for it).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from beam_dl.models import checkpoints

SPEC_COPY = 'beam_dl_spec.json'
_log = logging.getLogger(__name__)


def polymorphic_shapes(spec: checkpoints.ModelSpec) -> list[str]:
  """jax2tf shape specs of the fed inputs: batch `b` (and length `t`) symbolic."""
  if spec.is_sequence:
    steps = ', '.join(str(d) for d in spec.input_shape[1:])
    return [f'(b, t, {steps})' if steps else '(b, t)', '(b, t)']
  dims = ', '.join(str(d) for d in spec.input_shape)
  return [f'(b, {dims})' if dims else '(b,)']


def jax_predict_fn(spec: checkpoints.ModelSpec):
  """(variables, x[, mask]) -> outputs, the same forward pass the handler jits."""
  module = spec.build()

  def predict(variables, x, *rest):
    return module.apply(variables, spec.normalize(x), *rest)

  return predict


def export_saved_model(model_dir: str, export_dir: str) -> str:
  """Writes `model_dir`'s model as a SavedModel to `export_dir`; returns export_dir.

  Raises ValueError when jax2tf cannot convert the model (an op without a
  StableHLO lowering, or a shape the polymorphic batch cannot express).
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  spec, variables = checkpoints.load(model_dir)
  shapes = polymorphic_shapes(spec)
  converted = jax2tf.convert(
    jax_predict_fn(spec), polymorphic_shapes=[None, *shapes], with_gradient=False, native_serialization=True
  )
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), variables)
  if spec.is_sequence:
    signature = [
      tf.TensorSpec((None, None, *spec.input_shape[1:]), spec.input_dtype, name='inputs'),
      tf.TensorSpec((None, None), tf.bool, name='mask'),
    ]
  else:
    signature = [tf.TensorSpec((None, *spec.input_shape), spec.input_dtype, name='inputs')]

  @tf.function(autograph=False, input_signature=signature)
  def serve(*inputs):
    return {'outputs': converted(module.variables_tree, *inputs)}

  @tf.function(autograph=False, input_signature=signature)
  def call(*inputs):
    return converted(module.variables_tree, *inputs)

  module.serve, module.__call__ = serve, call
  try:
    tf.saved_model.save(module, export_dir, signatures={'serving_default': serve})
  except Exception as e:  # jax2tf lowering errors surface here, with many types
    raise ValueError(f'{spec.name}: jax2tf cannot export this model: {e}') from e
  with tf.io.gfile.GFile(os.path.join(export_dir, SPEC_COPY), 'w') as f:
    f.write(spec.to_json())
  _log.info('exported %s (%s) to %s, input %s', model_dir, spec.name, export_dir, shapes)
  return export_dir


def compare(model_dir: str, export_dir: str, inputs: Sequence[np.ndarray]) -> float:
  """Largest |SavedModel - JAX| output difference over `inputs` (the fed arrays:
  (x,) or (x, mask)); the check that the export predicts what JAX predicts."""
  import jax
  import tensorflow as tf

  spec, variables = checkpoints.load(model_dir)
  want = np.asarray(jax.jit(jax_predict_fn(spec))(variables, *inputs))
  loaded = tf.saved_model.load(export_dir)
  named = dict(zip(('inputs', 'mask'), (tf.constant(a) for a in inputs)))
  got = loaded.signatures['serving_default'](**named)['outputs'].numpy()
  if got.shape != want.shape:
    raise ValueError(f'SavedModel outputs {got.shape}, JAX outputs {want.shape}')
  return float(np.max(np.abs(got - want))) if want.size else 0.0


def example_inputs(spec: checkpoints.ModelSpec, batch_size: int = 4, seed: int = 0) -> tuple[Any, ...]:
  """Random fed inputs of the spec's shape and dtype (for a smoke check)."""
  rng = np.random.default_rng(seed)
  if spec.is_sequence:
    length = 7
    x = rng.normal(size=(batch_size, length, *spec.input_shape[1:])).astype(spec.input_dtype)
    mask = np.arange(length)[None, :] < rng.integers(1, length + 1, size=(batch_size, 1))
    return x, mask
  shape = (batch_size, *spec.input_shape)
  if np.issubdtype(np.dtype(spec.input_dtype), np.integer):
    info = np.iinfo(spec.input_dtype)
    return (rng.integers(info.min, info.max, size=shape, endpoint=True).astype(spec.input_dtype),)
  return (rng.normal(size=shape).astype(spec.input_dtype),)
