"""RunInference wiring with per-element dead letters, and image classification.

  RunInferenceWithDeadLetters(handler)  keyed examples -> (key, PredictionResult);
                                         elements of a failed batch are retried one by
                                         one, what still fails -> one dead letter each
  ClassifyImages(model_dir)             (key, encoded image) -> prediction records
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.ml.inference import base as beam_inference
from apache_beam.ml.inference.base import KeyedModelHandler, MaybeKeyedModelHandler, ModelHandler, RunInference

from beam_dl import checkpoints
from beam_dl.deadletter import FAILED, dead_letter, describe
from beam_dl.handler import JaxModelHandler
from beam_dl.io.images import ImageSpec
from beam_dl.postprocess import classification_record
from transforms.images import DecodeImages

# Beam's wrappers that add pre/post-processing fns around a handler.
_FN_WRAPPERS = (beam_inference._PreProcessingModelHandler, beam_inference._PostProcessingModelHandler)  # pylint: disable=protected-access


class InferenceOutputs(NamedTuple):
  predictions: beam.PCollection
  failed: beam.PCollection


def failed_batch_to_dead_letters(failure: tuple[Any, Any], stage: str = 'inference') -> Iterable[dict]:
  """Beam's failed-inference record (batch, error info) -> one record per input."""
  batch, error = failure
  reason = _error_reason(error)
  for element in _elements(batch):
    key = element[0] if _is_keyed(element) else None
    yield dead_letter(key, stage, reason)


def failed_batch_elements(failure: tuple[Any, Any]) -> Iterable[list]:
  """A failed batch's elements, each as its own one-element batch to retry."""
  batch, _ = failure
  for element in _elements(batch):
    yield [element]


def _elements(batch: Any) -> list:
  """The elements Beam's DLQ reports as failed: a batch's list, or one element."""
  return batch if isinstance(batch, (list, tuple)) and not _is_keyed(batch) else [batch]


def _is_keyed(element: Any) -> bool:
  return isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], (str, bytes, int))


def _error_reason(error: Any) -> str:
  """One line 'Type: message' from what Beam's exception handling passes:
  (exc_type, repr(exc), traceback) or an exception."""
  if isinstance(error, BaseException):
    return describe(error)
  if isinstance(error, tuple) and len(error) >= 2 and isinstance(error[0], type):
    name, text = error[0].__name__, str(error[1])
    if text.startswith(f'{name}(') and text.endswith(')'):
      text = text[len(name) + 1 : -1].strip('\'"')
    first = text.splitlines()[0] if text.strip() else ''
    return f'{name}: {first}' if first else name
  if isinstance(error, tuple) and len(error) >= 2:
    return str(error[1]).splitlines()[0]
  return str(error).splitlines()[0]


def _unwrap(handler: ModelHandler) -> ModelHandler:
  """The handler under Beam's pre/post-processing wrappers (they keep it in `_base`)."""
  while isinstance(handler, _FN_WRAPPERS):
    handler = handler._base  # pylint: disable=protected-access
  return handler


def _keyed(handler: ModelHandler) -> ModelHandler:
  """`handler` as is when it (under its pre/post fns) is keyed, else KeyedModelHandler(handler)."""
  if isinstance(_unwrap(handler), (KeyedModelHandler, MaybeKeyedModelHandler)):
    return handler
  return KeyedModelHandler(handler)


class _PostProcess(beam.DoFn):
  """Applies a handler's post-processing fns to retried results; a failure is a dead letter."""

  def __init__(self, fns):
    self._fns = list(fns)

  def process(self, result):
    try:
      for fn in self._fns:
        result = fn(result)
    except Exception as e:  # a bad result must not fail the bundle
      key = result[0] if _is_keyed(result) else None
      yield beam.pvalue.TaggedOutput(FAILED, dead_letter(key, 'postprocess', describe(e)))
      return
    yield result


class RunInferenceWithDeadLetters(beam.PTransform):
  """RunInference over (key, example); nothing is lost when a batch fails.

  Steps: RunInference with Beam's exception handling; every element of a
  batch that raised is retried alone (one bad element, e.g. one that runs out
  of device memory even by itself, must not fail its neighbours); what fails
  alone becomes one dead letter {"key", "stage": "inference", "reason"}.
  Pre- and post-processing failures become dead letters too.

  Args:
    model_handler: any ModelHandler over examples (wrapped in
      KeyedModelHandler here) or an already keyed one, with or without
      with_preprocess_fn / with_postprocess_fn.
    model_metadata_pcoll: optional ModelMetadata side input for model
      refresh (both the batched and the retry step follow it).
    inference_args: passed to the handler's run_inference.
    model_identifier: Shared tag for the loaded model; both steps use it so
      the model is loaded once per process (default: unique per transform).
    retry_elements: False sends failed batches straight to dead letters
      (also the case in streaming with model_metadata_pcoll; see expand).
  """

  def __init__(
      self,
      model_handler: ModelHandler,
      model_metadata_pcoll=None,
      *,
      inference_args: Optional[dict] = None,
      model_identifier: Optional[str] = None,
      retry_elements: bool = True,
  ):
    super().__init__()
    self._handler = _keyed(model_handler)
    self._metadata = model_metadata_pcoll
    self._inference_args = inference_args
    self._model_identifier = model_identifier or f'RunInferenceWithDeadLetters-{uuid.uuid4().hex}'
    self._retry = retry_elements

  def expand(self, keyed_examples):
    main, dlq = keyed_examples | 'RunInference' >> RunInference(
        self._handler,
        model_metadata_pcoll=self._metadata,
        inference_args=self._inference_args,
        model_identifier=self._model_identifier,
    ).with_exception_handling()
    failures = [
        failed | f'PreprocessDeadLetters{i}' >> beam.FlatMap(failed_batch_to_dead_letters, 'preprocess')
        for i, failed in enumerate(dlq.failed_preprocessing)
    ]
    failures += [
        failed | f'PostprocessDeadLetters{i}' >> beam.FlatMap(failed_batch_to_dead_letters, 'postprocess')
        for i, failed in enumerate(dlq.failed_postprocessing)
    ]
    if not self._retry or (self._metadata is not None and _is_streaming(keyed_examples.pipeline)):
      # A second RunInference on the same ModelMetadata side input never
      # finishes on Beam 2.77's streaming DirectRunner (its side-input wait
      # is never released), so in streaming with refresh a failed batch is
      # dead-lettered whole: every element still lands once, with its reason.
      failures.append(dlq.failed_inferences | 'PerElementDeadLetters' >> beam.FlatMap(failed_batch_to_dead_letters))
      return InferenceOutputs(main, _merge(failures, keyed_examples.pipeline))
    base = _unwrap(self._handler)  # elements of failed batches are already pre-processed
    retried, retry_dlq = (
        dlq.failed_inferences
        | 'SplitFailedBatches' >> beam.FlatMap(failed_batch_elements)
        | 'RetryOneByOne' >> RunInference(
            base.with_no_batching(),
            model_metadata_pcoll=self._metadata,
            inference_args=self._inference_args,
            model_identifier=self._model_identifier,
        ).with_exception_handling()
    )
    retried = retried | 'PostprocessRetried' >> beam.ParDo(
        _PostProcess(self._handler.get_postprocess_fns())
    ).with_outputs(FAILED, main='ok')
    failures += [
        retry_dlq.failed_inferences | 'PerElementDeadLetters' >> beam.FlatMap(failed_batch_to_dead_letters),
        retried[FAILED],
    ]
    predictions = (main, retried.ok) | 'MergePredictions' >> beam.Flatten()
    return InferenceOutputs(predictions, _merge(failures, keyed_examples.pipeline))


def _is_streaming(pipeline) -> bool:
  from apache_beam.options.pipeline_options import StandardOptions

  return bool(pipeline.options and pipeline.options.view_as(StandardOptions).streaming)


def _merge(failures, pipeline):
  return tuple(failures) | 'MergeDeadLetters' >> beam.Flatten(pipeline=pipeline)


def without_example(keyed_result: tuple) -> tuple:
  """(key, PredictionResult) with the result's input dropped (formatting
  needs only the outputs)."""
  key, result = keyed_result
  return key, result._replace(example=None)


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
    # Results cross a stage boundary (the retry branch's Flatten) that the
    # local runner holds whole: without the input image they are ~100x smaller.
    handler = _keyed(self._handler).with_postprocess_fn(without_example)
    inferred = decoded.decoded | 'Infer' >> RunInferenceWithDeadLetters(handler)
    labels = self._labels
    predictions = inferred.predictions | 'FormatPredictions' >> beam.MapTuple(
        lambda key, result: classification_record(key, result, labels)
    )
    failed = (decoded.failed, inferred.failed) | 'MergeFailures' >> beam.Flatten()
    return InferenceOutputs(predictions, failed)
