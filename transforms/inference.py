"""RunInference wiring with per-element dead letters, and image classification.

RunInferenceWithDeadLetters(handler)  keyed examples -> (key, PredictionResult);
                                       a failed batch is split in place until its
                                       bad elements stand alone, each one dead letter
ClassifyImages(model_dir)             (key, encoded image) -> prediction records
"""

from __future__ import annotations

import traceback
from typing import Any, Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference import base as beam_inference
from apache_beam.ml.inference.base import KeyedModelHandler, MaybeKeyedModelHandler, ModelHandler, RunInference

from beam_dl.core.deadletter import FAILED, ErrorHandling, dead_letter, describe
from beam_dl.core.element_types import DeadLetter, EncodedImage
from beam_dl.core.isolate import Failed, isolate
from beam_dl.decoding.images import ImageSpec
from beam_dl.models import checkpoints
from beam_dl.serving.handler import METRICS_NAMESPACE, JaxModelHandler, deferred_reads
from beam_dl.serving.postprocess import classification_record
from transforms.images import DecodeImages

# Beam's wrappers that add pre/post-processing fns around a handler.
_FN_WRAPPERS = (beam_inference._PreProcessingModelHandler, beam_inference._PostProcessingModelHandler)  # pylint: disable=protected-access


class InferenceOutputs(NamedTuple):
  predictions: beam.PCollection
  failed: beam.PCollection


def failed_batch_to_dead_letters(failure: tuple[Any, Any], stage: str = 'inference') -> Iterable[dict]:
  """Beam's failed record (what failed, error info) -> one dead letter per input.

  The handler is keyed by construction (`_keyed`), so what failed is known:
  a failed inference is a batch, a list of (key, example); a failed pre- or
  post-processing fn is one (key, value). The error info is what Beam's
  exception handling records, an exception, or the reason itself (an
  element the isolating handler failed alone).
  """
  failed, error = failure
  reason = _error_reason(error)
  for key, _ in failed if stage == 'inference' else [failed]:
    yield dead_letter(key, stage, reason)


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
  """`handler` as is when it (under its pre/post fns) is keyed, else KeyedModelHandler(handler).

  Every element here is (key, example), so that each dead letter names its
  input: a MaybeKeyedModelHandler (keys optional) is refused.
  """
  if isinstance(_unwrap(handler), MaybeKeyedModelHandler):
    raise ValueError(
      'RunInferenceWithDeadLetters takes (key, example) elements: pass the handler '
      'itself or a KeyedModelHandler, not a MaybeKeyedModelHandler'
    )
  if isinstance(_unwrap(handler), KeyedModelHandler):
    return handler
  return KeyedModelHandler(handler)


class _Isolated(NamedTuple):
  """Stands in RunInference's output for an element that failed alone."""

  key: Any
  reason: str


class _IsolatingModelHandler(ModelHandler):
  """`base` whose run_inference never fails a batch for a bad element.

  A batch that raises is split in place (`beam_dl.core.isolate`) until each
  failing element stands alone; it comes out as an `_Isolated` (key, reason)
  in its position, and the rest keep their predictions. The same DoFn does
  it, so nothing extra crosses a stage boundary (a separate retry step and
  its merge held every failed batch and every result). Post-processing fns
  pass `_Isolated` through untouched; everything else is `base`'s.
  """

  def __init__(self, base: ModelHandler):
    self._base = base
    self._env_vars = getattr(base, '_env_vars', {})

  def run_inference(self, batch, model, inference_args=None):
    outcomes = isolate(lambda part: list(self._base.run_inference(part, model, inference_args)), batch)
    return [
      _Isolated(key, describe(outcome.error)) if isinstance(outcome, Failed) else outcome
      for (key, _), outcome in zip(batch, outcomes)  # keyed by construction: (key, example)
    ]

  def get_postprocess_fns(self):
    return [_PassIsolated(fn) for fn in self._base.get_postprocess_fns()]

  def load_model(self):
    return self._base.load_model()

  def get_num_bytes(self, batch) -> int:
    return self._base.get_num_bytes(batch)

  def get_metrics_namespace(self) -> str:
    return self._base.get_metrics_namespace()

  def get_resource_hints(self):
    return self._base.get_resource_hints()

  def batch_elements_kwargs(self):
    return self._base.batch_elements_kwargs()

  def validate_inference_args(self, inference_args):
    return self._base.validate_inference_args(inference_args)

  def update_model_path(self, model_path=None):
    return self._base.update_model_path(model_path=model_path)

  def update_model_paths(self, model, model_paths=None):
    return self._base.update_model_paths(model, model_paths)

  def get_preprocess_fns(self):
    return self._base.get_preprocess_fns()

  def should_skip_batching(self) -> bool:
    return self._base.should_skip_batching()

  def set_environment_vars(self):
    return self._base.set_environment_vars()

  def share_model_across_processes(self) -> bool:
    return self._base.share_model_across_processes()

  def model_copies(self) -> int:
    return self._base.model_copies()

  def override_metrics(self, metrics_namespace: str = '') -> bool:
    return self._base.override_metrics(metrics_namespace)

  def should_garbage_collect_on_timeout(self) -> bool:
    return self._base.should_garbage_collect_on_timeout()


class _PassIsolated:
  """A post-processing fn that leaves `_Isolated` elements as they are."""

  def __init__(self, fn):
    self._fn = fn

  def __call__(self, result):
    return result if isinstance(result, _Isolated) else self._fn(result)


class _HeldBatch(NamedTuple):
  """A batch whose forward pass was dispatched but whose outputs are not
  read yet, with what it takes to emit or re-run it."""

  windowed: Any  # the input batch's WindowedValue: its outputs keep its windows and timestamp
  inference_args: Any
  model: Any  # Beam's model wrapper it was dispatched on (a refresh may swap self._model)
  predictions: list
  reads: list
  metrics: Optional['_HeldMetrics']  # Beam's per-batch metrics update, made once the outputs are read


class _HeldMetrics:
  """Stands in Beam's metrics collector while a batch is dispatched: keeps
  the per-batch update (elements, bytes, latency) that Beam's
  `_run_inference` makes when the dispatch returns, so that it is made when
  the outputs are read, with the latency from the dispatch to then. Beam's
  own figure would be the dispatch alone (~1% of a forward pass). Anything
  else (the failed-batches counter, model-load metrics) goes to the
  collector itself."""

  def __init__(self, collector, clock):
    self._collector, self._clock = collector, clock
    self._start_ns = clock.time_ns()
    self._update: Optional[tuple[int, int]] = None

  def update(self, examples_count, examples_byte_size, latency_micro_secs):  # pylint: disable=unused-argument
    self._update = (examples_count, examples_byte_size)

  def __getattr__(self, name):
    return getattr(self._collector, name)

  def commit(self):
    """Beam's update, with the latency up to now (the outputs just read)."""
    if self._update is not None:
      self._collector.update(*self._update, (self._clock.time_ns() - self._start_ns) // 1000)


class _DispatchAheadDoFn(beam_inference._RunInferenceDoFn):  # pylint: disable=protected-access
  """Beam's RunInference DoFn, one batch deep: dispatches batch k's forward
  pass, then reads and emits batch k-1 while the model computes batch k.

  Why: in a fused stage the bundle's thread runs every step (batching,
  formatting, writing) and waited for each forward pass before doing any of
  them for the next batch; a hand-written loop dispatches batch k+1 before
  reading batch k, so its host work overlaps the model. Here the handler's
  predict calls run inside `beam_dl.serving.handler.deferred_reads`, which leaves the
  outputs unread; the DoFn holds the batch and reads it on the next batch (or
  in finish_bundle, so a streaming bundle ends with nothing held).
  Everything else is Beam's own DoFn: shared model, metrics, model refresh
  from the side input. Beam's per-batch metrics are recorded when the batch
  is read, its latency (`inference_batch_latency_micro_secs`) from the
  dispatch to the read (`_HeldMetrics`): the time the batch's outputs took to
  be there, not the dispatch's.

  Outputs keep their own batch's windows and timestamp. Failed batches go to
  the `FAILED_BATCHES` output as Beam's exception handling writes them
  ((batch, (type, repr, traceback))), each with its own batch: an error at
  dispatch fails the batch being processed, never the held one; a batch
  whose read fails (an error the computation hit after dispatch) is run
  again, whole and synchronously, on the model it was dispatched on, so an
  isolating handler (`_IsolatingModelHandler`) dead-letters exactly its bad
  elements, and a batch that fails again is that batch's failure. Handlers
  that read their outputs at once (a custom inference_fn, large_model) leave
  nothing to read later: their batch is emitted at once. Counts
  'late_read_failures' (batches re-run because their read failed).

  One instance runs one bundle at a time (Beam's contract), so the held
  batch needs no lock; the read buffers belong to that one batch.
  """

  FAILED_BATCHES = 'failed_batches'
  FAILED_POSTPROCESS = 'failed_postprocess'

  def __init__(self, model_handler, clock, metrics_namespace, enable_side_input_loading, model_tag, postprocess_fns=()):
    super().__init__(model_handler, clock, metrics_namespace, enable_side_input_loading, model_tag)
    self._postprocess_fns = tuple(postprocess_fns)

  def setup(self):
    super().setup()
    self._late_failures = Metrics.counter(METRICS_NAMESPACE, 'late_read_failures')

  def start_bundle(self):
    self._held: Optional[_HeldBatch] = None

  def process(self, batch, inference_args, si_model_metadata, windowed=beam.DoFn.WindowedValueParam):
    collector = self._metrics_collector
    metrics = _HeldMetrics(collector, self._clock) if collector else None
    try:
      with deferred_reads() as reads:
        self._metrics_collector = metrics or collector
        predictions = super().process(batch, inference_args, si_model_metadata)
    except Exception as e:  # pylint: disable=broad-except  # this batch's failure, as Beam's handling records it
      yield self._failed(windowed, e)
      return
    finally:
      self._metrics_collector = collector
    current = _HeldBatch(windowed, inference_args, self._model, predictions, reads, metrics)
    held, self._held = self._held, (current if reads else None)
    if held is not None:
      yield from self._release(held)
    if not reads:
      yield from self._release(current)

  def finish_bundle(self):
    held, self._held = self._held, None
    if held is not None:
      yield from self._release(held)
    super().finish_bundle()

  def _release(self, held: _HeldBatch) -> Iterable:
    """The held batch's outputs, read (or re-run), in its windows."""
    try:
      for read in held.reads:
        read()
      predictions = held.predictions
    except Exception:  # pylint: disable=broad-except  # re-run to find whose error it is (the re-run counts itself)
      self._late_failures.inc()
      current, self._model = self._model, held.model
      try:
        predictions = self._run_inference(held.windowed.value, held.inference_args)
      except Exception as e:  # pylint: disable=broad-except
        yield self._failed(held.windowed, e)
        return
      finally:
        self._model = current
    else:  # read as dispatched: Beam's per-batch metrics, latency up to the read
      if held.metrics:
        held.metrics.commit()
    for prediction in predictions:
      yield self._postprocessed(held.windowed, prediction)

  def _postprocessed(self, windowed, value):
    """`value` through the post-processing fns, in `windowed`'s windows; the
    failed record of the first fn that raises, tagged FAILED_POSTPROCESS. An
    element the isolating handler failed alone (`_Isolated`) is a failed
    batch of its own, (its (key, None), its reason), tagged FAILED_BATCHES:
    its dead letter needs no step of its own downstream."""
    if isinstance(value, _Isolated):
      return beam.pvalue.TaggedOutput(self.FAILED_BATCHES, windowed.with_value(([(value.key, None)], value.reason)))
    for fn in self._postprocess_fns:
      try:
        value = fn(value)
      except Exception as e:  # pylint: disable=broad-except  # this element's failure, as Beam's handling records it
        return beam.pvalue.TaggedOutput(self.FAILED_POSTPROCESS, windowed.with_value((value, _error_info(e))))
    return windowed.with_value(value)

  def _failed(self, windowed, error: Exception):
    """The failed batch record Beam's `with_exception_handling` writes."""
    return beam.pvalue.TaggedOutput(self.FAILED_BATCHES, windowed.with_value((windowed.value, _error_info(error))))


def _error_info(error: Exception) -> tuple:
  """(type, repr, traceback lines): the error as Beam's exception handling records it."""
  return type(error), repr(error), traceback.format_exception(type(error), error, error.__traceback__)


class _DispatchAheadRunInference(RunInference):
  """RunInference whose inference step is `_DispatchAheadDoFn`.

  Beam builds its DoFn inline in `RunInference.expand`, with no hook to swap
  it, so this expand repeats Beam's wiring for what RunInferenceWithDeadLetters
  uses: pre-processing fns, BatchElements, the inference ParDo with the model
  metadata side input, same step labels, and the same dead-letter outputs
  (`RunInferenceDLQ`); the post-processing fns run inside the DoFn. The DoFn
  records its own failed batches: Beam's exception-handling wrapper would
  hide the WindowedValue parameter the held batch needs, and would charge a
  held batch's error to the batch being processed.
  """

  def expand(self, pcoll):
    handler = self._model_handler
    handler.validate_inference_args(self._inference_args)
    pcoll, bad_preprocessed = self._apply_fns(pcoll, handler.get_preprocess_fns(), 'BeamML_RunInference_Preprocess')
    if not handler.should_skip_batching():
      pcoll = pcoll | beam.BatchElements(**handler.batch_elements_kwargs())
    metadata = self._model_metadata_pcoll
    postprocess_fns = handler.get_postprocess_fns()
    dofn = _DispatchAheadDoFn(
      handler, self._clock, self._metrics_namespace, metadata is not None, self._model_tag, postprocess_fns
    )
    inferred = pcoll | 'BeamML_RunInference' >> beam.ParDo(
      dofn, self._inference_args, beam.pvalue.AsSingleton(metadata) if metadata else None
    ).with_resource_hints(**handler.get_resource_hints()).with_outputs(
      _DispatchAheadDoFn.FAILED_BATCHES, _DispatchAheadDoFn.FAILED_POSTPROCESS, main='results'
    )
    bad_postprocessed = [inferred[_DispatchAheadDoFn.FAILED_POSTPROCESS]] if postprocess_fns else []
    return inferred.results, beam_inference.RunInferenceDLQ(
      inferred[_DispatchAheadDoFn.FAILED_BATCHES], bad_preprocessed, bad_postprocessed
    )


def _isolated_to_dead_letters(result) -> Iterable:
  """An `_Isolated` -> its dead letter (tagged FAILED); a prediction as is."""
  if isinstance(result, _Isolated):
    yield beam.pvalue.TaggedOutput(FAILED, dead_letter(result.key, 'inference', result.reason))
  else:
    yield result


class RunInferenceWithDeadLetters(ErrorHandling, beam.PTransform):
  """RunInference over (key, example); nothing is lost when a batch fails.

  Steps: RunInference with Beam's exception handling, whose handler splits a
  batch that raises, in place, until each failing element stands alone (one
  bad element, e.g. one that runs out of device memory even by itself, must
  not fail its neighbours); each becomes one dead letter {"key", "stage":
  "inference", "reason"} (made by the dispatch-ahead step itself, else by an
  'IsolatedDeadLetters' step). Pre- and post-processing failures become dead
  letters too.

  Args:
    model_handler: any ModelHandler over examples (wrapped in
      KeyedModelHandler here) or an already keyed one, with or without
      with_preprocess_fn / with_postprocess_fn.
    model_metadata_pcoll: optional ModelMetadata side input for model refresh.
    inference_args: passed to the handler's run_inference.
    model_identifier: Beam's tag for the loaded model (shares a large_model
      model between steps that name the same one; default: unique).
    isolate_elements: False sends a failed batch straight to dead letters,
      one per element, all with the batch's reason.
    dispatch_ahead: dispatch batch k's forward pass before reading and
      emitting batch k-1's outputs (`_DispatchAheadDoFn`), so the bundle
      thread's other work overlaps the model (default on; False: Beam's own
      RunInference step).
    error_threshold: fail the job when more than this fraction of inputs
      (per window) become dead letters, as Beam's
      `with_exception_handling(threshold=...)`; 1 (default) never fails.
      `with_error_handler(ErrorHandler(...))` also sends them to a handler.
  """

  def __init__(
    self,
    model_handler: ModelHandler,
    model_metadata_pcoll=None,
    *,
    inference_args: Optional[dict] = None,
    model_identifier: Optional[str] = None,
    isolate_elements: bool = True,
    dispatch_ahead: bool = True,
    error_threshold: float = 1.0,
  ):
    super().__init__()
    self._handler = _keyed(model_handler)
    self._dispatch_ahead = dispatch_ahead
    self._metadata = model_metadata_pcoll
    self._inference_args = inference_args
    self._model_identifier = model_identifier
    self._isolate = isolate_elements
    self._set_error_threshold(error_threshold)

  def expand(self, keyed_examples):
    handler = _IsolatingModelHandler(self._handler) if self._isolate else self._handler
    run_inference = _DispatchAheadRunInference if self._dispatch_ahead else RunInference
    main, dlq = (
      keyed_examples
      | 'RunInference'
      >> run_inference(
        handler,
        model_metadata_pcoll=self._metadata,
        inference_args=self._inference_args,
        model_identifier=self._model_identifier,
      ).with_exception_handling()
    )
    failures = [
      failed
      | f'PreprocessDeadLetters{i}'
      >> beam.FlatMap(failed_batch_to_dead_letters, 'preprocess').with_output_types(DeadLetter)
      for i, failed in enumerate(dlq.failed_preprocessing)
    ]
    failures += [
      failed
      | f'PostprocessDeadLetters{i}'
      >> beam.FlatMap(failed_batch_to_dead_letters, 'postprocess').with_output_types(DeadLetter)
      for i, failed in enumerate(dlq.failed_postprocessing)
    ]
    # A batch fails as a whole only when isolation is off or the error is
    # not the elements' (e.g. the model cannot be loaded).
    failures.append(
      dlq.failed_inferences
      | 'PerElementDeadLetters' >> beam.FlatMap(failed_batch_to_dead_letters).with_output_types(DeadLetter)
    )
    if not self._isolate or self._dispatch_ahead:  # the dispatch-ahead step fails isolated elements itself
      predictions = main
    else:
      separated = main | 'IsolatedDeadLetters' >> beam.FlatMap(_isolated_to_dead_letters).with_outputs(
        FAILED, main='predictions'
      )
      predictions = separated.predictions
      failures.append(separated[FAILED])
    failed = tuple(failures) | 'MergeDeadLetters' >> beam.Flatten(pipeline=keyed_examples.pipeline)
    return InferenceOutputs(predictions, self._report_failures(keyed_examples, failed))


class _ClassificationRecord:
  """(key, PredictionResult) -> its classification record (a post-processing
  fn: it runs where the prediction is made, and the decoded image goes no
  further)."""

  def __init__(self, labels):
    self._labels = labels

  def __call__(self, keyed_result: tuple) -> dict:
    key, result = keyed_result
    return classification_record(key, result, self._labels)


@beam.typehints.with_input_types(EncodedImage)
class ClassifyImages(ErrorHandling, beam.PTransform):
  """(key, encoded image bytes) -> classification records, plus dead letters.

  Decodes to the model's input size and channels (read from the model's
  spec.json at construction, so a wrong model_dir fails before the job
  starts), runs the Flax classifier, and formats
  {"key", "label", "score", "scores"}. `.failed` holds decode and inference
  dead letters. `error_threshold` (fraction of inputs, default 1: never)
  fails the job when more inputs than that become dead letters;
  `with_error_handler(ErrorHandler(...))` also sends them to Beam's handler.
  `dispatch_ahead` (default on): see RunInferenceWithDeadLetters.
  """

  def __init__(
    self,
    model_dir: str,
    handler: Optional[JaxModelHandler] = None,
    *,
    error_threshold: float = 1.0,
    dispatch_ahead: bool = True,
    **handler_kwargs,
  ):
    super().__init__()
    spec = checkpoints.load_spec(model_dir)
    if len(spec.input_shape) != 3:
      raise ValueError(f'{model_dir}: model input {spec.input_shape} is not an image [H, W, C]')
    height, width, channels = spec.input_shape
    self._image_spec = ImageSpec(height=height, width=width, channels=channels)
    self._labels = spec.labels
    self._handler = handler or JaxModelHandler(model_dir, **handler_kwargs)
    self._dispatch_ahead = dispatch_ahead
    self._set_error_threshold(error_threshold)

  def expand(self, keyed_bytes):
    decoded = keyed_bytes | 'DecodeImages' >> DecodeImages(self._image_spec)
    # Records are made as each prediction is read: no result carries its
    # input image past the inference step (~100x smaller wherever a runner
    # buffers them), and a record that can't be made is one dead letter.
    handler = _keyed(self._handler).with_postprocess_fn(_ClassificationRecord(self._labels))
    inferred = decoded.decoded | 'Infer' >> RunInferenceWithDeadLetters(handler, dispatch_ahead=self._dispatch_ahead)
    failed = (decoded.failed, inferred.failed) | 'MergeFailures' >> beam.Flatten()
    return InferenceOutputs(inferred.predictions, self._report_failures(keyed_bytes, failed))
