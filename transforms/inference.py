"""RunInference wiring with per-element dead letters, and image classification.

  RunInferenceWithDeadLetters(handler)  keyed examples -> (key, PredictionResult),
                                         failed batches -> one dead letter per element
  ClassifyImages(model_dir)             (key, encoded image) -> prediction records
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from beam_dl import checkpoints
from beam_dl.deadletter import dead_letter
from beam_dl.handler import JaxModelHandler
from beam_dl.io.images import ImageSpec
from beam_dl.postprocess import classification_record
from transforms.images import DecodeImages


class InferenceOutputs(NamedTuple):
  predictions: beam.PCollection
  failed: beam.PCollection


def failed_batch_to_dead_letters(failure: tuple[Any, Any]) -> Iterable[dict]:
  """Beam's failed-inference record (batch, error info) -> one record per input."""
  batch, error = failure
  reason = _error_reason(error)
  elements = batch if isinstance(batch, (list, tuple)) and not _is_keyed(batch) else [batch]
  for element in elements:
    key = element[0] if _is_keyed(element) else None
    yield dead_letter(key, 'inference', reason)


def _is_keyed(element: Any) -> bool:
  return isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], (str, bytes, int))


def _error_reason(error: Any) -> str:
  """Beam passes (exc_type, repr, traceback) or an exception; keep one line."""
  if isinstance(error, BaseException):
    return f'{type(error).__name__}: {error}'
  if isinstance(error, tuple) and len(error) >= 2:
    return str(error[1]).splitlines()[0]
  return str(error).splitlines()[0]


class RunInferenceWithDeadLetters(beam.PTransform):
  """RunInference over (key, example); nothing is lost when a batch fails.

  A batch whose inference raises becomes one dead letter per element with the
  error as reason (Beam's own DLQ yields whole batches).
  """

  def __init__(self, model_handler: ModelHandler, model_metadata_pcoll=None):
    super().__init__()
    self._handler = KeyedModelHandler(model_handler)
    self._metadata = model_metadata_pcoll

  def expand(self, keyed_examples):
    main, dlq = keyed_examples | 'RunInference' >> RunInference(
        self._handler, model_metadata_pcoll=self._metadata
    ).with_exception_handling()
    failed = dlq.failed_inferences | 'PerElementDeadLetters' >> beam.FlatMap(failed_batch_to_dead_letters)
    return InferenceOutputs(main, failed)


class ClassifyImages(beam.PTransform):
  """(key, encoded image bytes) -> classification records, plus dead letters.

  Decodes to the model's input size and channels (read from the model's
  spec.json at construction, so a wrong model_dir fails before the job
  starts), runs the Flax classifier, and formats
  {"key", "label", "score", "scores"}. `.failed` holds decode and inference
  dead letters.
  """

  def __init__(self, model_dir: str, handler: Optional[JaxModelHandler] = None, **handler_kwargs):
    super().__init__()
    spec = checkpoints.load_spec(model_dir)
    if len(spec.input_shape) != 3:
      raise ValueError(f'{model_dir}: model input {spec.input_shape} is not an image [H, W, C]')
    height, width, channels = spec.input_shape
    self._image_spec = ImageSpec(height=height, width=width, channels=channels)
    self._labels = spec.labels
    self._handler = handler or JaxModelHandler(model_dir, **handler_kwargs)

  def expand(self, keyed_bytes):
    decoded = keyed_bytes | 'DecodeImages' >> DecodeImages(self._image_spec)
    inferred = decoded.decoded | 'Infer' >> RunInferenceWithDeadLetters(self._handler)
    labels = self._labels
    predictions = inferred.predictions | 'FormatPredictions' >> beam.MapTuple(
        lambda key, result: classification_record(key, result, labels)
    )
    failed = (decoded.failed, inferred.failed) | 'MergeFailures' >> beam.Flatten()
    return InferenceOutputs(predictions, failed)
