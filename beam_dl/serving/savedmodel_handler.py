"""RunInference handlers for a SavedModel that `beam_dl.serving.savedmodel_export` wrote.

The export is JAX's own function (jax2tf), so these serve exactly what
`JaxModelHandler` serves, for users whose workers have TensorFlow and not JAX:

    from beam_dl.serving.savedmodel_handler import SavedModelHandler
    predictions = images | RunInference(SavedModelHandler('saved_model'))
"""

from __future__ import annotations

from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult


class SavedModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """RunInference over an exported SavedModel's `serving_default` signature.

  Numpy examples in (the model's fed dtype and shape, one per element),
  `PredictionResult(example, outputs row)` out. Needs only TensorFlow, unlike
  Beam's TF handlers (see `tf_model_handler`). Fixed-shape models only: for
  sequence models, pad and mask upstream and call the signature directly.

  Args:
    export_dir: a directory written by `export_saved_model`.
    max_batch_size, min_batch_size: Beam batching bounds.
  """

  def __init__(self, export_dir: str, *, max_batch_size: int = 256, min_batch_size: int | None = None, **kwargs):
    super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, **kwargs)
    self._export_dir = export_dir

  def load_model(self):
    import tensorflow as tf

    return tf.saved_model.load(self._export_dir).signatures['serving_default']

  def run_inference(self, batch, model, inference_args=None):
    import tensorflow as tf

    outputs = model(inputs=tf.constant(np.stack(batch)))['outputs'].numpy()
    return [PredictionResult(example, row, self._export_dir) for example, row in zip(batch, outputs)]

  def get_num_bytes(self, batch) -> int:
    return sum(np.asarray(x).nbytes for x in batch)

  def get_metrics_namespace(self) -> str:
    return 'BeamDL_SavedModel'


def tf_model_handler(export_dir: str, **kwargs):
  """Beam's `TFModelHandlerNumpy` serving an exported SavedModel.

  Beam's TF handlers load with `tf.keras.models.load_model`, which Keras 3
  refuses for a plain SavedModel; this subclass loads it with
  `tf.saved_model.load` and keeps everything else of Beam's handler (batching,
  `PredictionResult`s, metrics). Needs the `tensorflow-hub` package, which
  Beam's TF inference module imports. `kwargs` go to `TFModelHandlerNumpy`.
  """
  from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

  class SavedModelHandlerNumpy(TFModelHandlerNumpy):
    def load_model(self):
      import tensorflow as tf

      return tf.saved_model.load(self._model_uri)

  return SavedModelHandlerNumpy(export_dir, **kwargs)
