"""Dead-letter records: how an input that could not be processed is reported.

Every input of a beam_dl transform ends in exactly one place: its main output
or the tagged output `FAILED` as a record of this shape, so a pipeline can
write, count and replay what failed instead of crashing or dropping it.
"""

from __future__ import annotations

from typing import Any, Optional

import apache_beam as beam

FAILED = 'failed'


def side_output(output: str, name: str) -> str:
  """The prefix of a side output `name` (dead letters, drift reports, ...)
  of a pipeline writing its main output to `<output>-SSSSS-of-NNNNN.*`:
  `<output>_<name>`, whose files the main output's documented glob
  `<output>-*` does not match."""
  return f'{output}_{name}'


def failed_output(output: str) -> str:
  """Where a pipeline writing `<output>-SSSSS-of-NNNNN.*` writes its dead
  letters: `<output>_failed-SSSSS-of-NNNNN.jsonl` (`side_output`)."""
  return side_output(output, FAILED)


def dead_letter(key: Any, stage: str, reason: str, **extra: Any) -> dict[str, Any]:
  """{"key", "stage", "reason"} (+ extra fields), JSON-serialisable."""
  record = {'key': None if key is None else str(key), 'stage': stage, 'reason': reason}
  record.update(extra)
  return record


def describe(error: BaseException) -> str:
  """A one-line reason for an exception: its type and message."""
  message = str(error).strip().splitlines()[0] if str(error).strip() else ''
  return f'{type(error).__name__}: {message}' if message else type(error).__name__


# Beam's error-handling conventions for transforms with a dead-letter output.
#
# `with_exception_handling(threshold=t)` on a Beam ParDo fails the job when,
# in a window, more than t of the inputs failed; `ErrorHandler` collects the
# error outputs of every transform given to it. beam_dl's transforms isolate
# failures per element (never per batch), so their rate is counted per input
# here, with the same rule and the same per-window scope.

ERROR_RATE_MARKER = 'beam_dl error rate exceeded:'


class ErrorRateExceeded(RuntimeError):
  """More inputs failed than the error threshold allows: the job fails."""


def check_error_rate(failed: int, total: int, threshold: float, what: str = 'inputs') -> None:
  """Raises ErrorRateExceeded when failed > total * threshold (Beam's rule)."""
  if failed > total * threshold:
    rate = failed / total if total else 1.0
    raise ErrorRateExceeded(
      f'{ERROR_RATE_MARKER} {failed} of {total} {what} failed ({rate:.1%}), '
      f'above the error threshold of {threshold:.1%}'
    )


def error_rate_message(error: BaseException) -> Optional[str]:
  """The one-line ErrorRateExceeded message inside `error`, if it holds one.

  A runner re-raises a worker's exception wrapped in its own (with the
  worker's traceback as text), so the line is found by its marker.
  """
  for line in str(error).splitlines():
    if ERROR_RATE_MARKER in line:
      message = line[line.index(ERROR_RATE_MARKER) + len(ERROR_RATE_MARKER) :]
      return message.split(' [while running ')[0].strip()  # the runner's step suffix
  return None


def validate_threshold(threshold: float) -> float:
  """An error threshold in [0, 1] (1: never fail), else ValueError."""
  if not 0 <= threshold <= 1:
    raise ValueError(f'error threshold must be in [0, 1], got {threshold}')
  return threshold


class FailAboveErrorRate(beam.PTransform):
  """Dead letters -> nothing; fails the job when, in a window, more than
  `threshold` of `inputs` (one PCollection or several, counted together)
  became dead letters.

  Only counts cross steps (Beam's Count combiner, lifted per bundle), never
  the elements, so watching the rate holds no data.
  """

  def __init__(self, inputs, threshold: float, what: str = 'inputs'):
    super().__init__()
    self._inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    self._threshold = validate_threshold(threshold)
    self._what = what

  def expand(self, dead_letters):
    counts = [
      pcoll | f'CountInputs{i}' >> beam.combiners.Count.Globally().without_defaults()
      for i, pcoll in enumerate(self._inputs)
    ]
    total = tuple(counts) | 'AllInputs' >> beam.Flatten(pipeline=dead_letters.pipeline)
    total = total | 'Total' >> beam.CombineGlobally(sum).as_singleton_view()
    return (
      dead_letters
      | 'CountFailed' >> beam.combiners.Count.Globally().without_defaults()
      | 'Check' >> beam.Map(check_error_rate, total, self._threshold, self._what)
    )


def report_failures(inputs, failed, threshold: float = 1.0, error_handler=None, what: str = 'inputs'):
  """What a transform with a `.failed` output does with it by Beam's
  conventions: a threshold below 1 adds 'ErrorRate' (FailAboveErrorRate),
  and an `ErrorHandler` (apache_beam.transforms.error_handling) receives the
  dead letters. Returns `failed` unchanged."""
  if threshold < 1:
    failed | 'ErrorRate' >> FailAboveErrorRate(inputs, threshold, what)
  if error_handler is not None:
    error_handler.add_error_pcollection(failed)
  return failed


class ErrorHandling:
  """Mixin for beam_dl PTransforms with a `.failed` output: Beam's
  `with_error_handler(handler)` (None: no handler), and an error threshold
  given to the constructor (`error_threshold`, in [0, 1]; 1 never fails)
  applied by `self._report_failures(inputs, failed)` at the end of expand."""

  _error_handler = None
  _error_threshold = 1.0

  def with_error_handler(self, error_handler):
    """Sends this transform's dead letters to `error_handler` as well."""
    self._error_handler = error_handler
    return self

  def _set_error_threshold(self, threshold: float) -> None:
    self._error_threshold = validate_threshold(threshold)

  def _report_failures(self, inputs, failed):
    return report_failures(inputs, failed, self._error_threshold, self._error_handler)
