"""Pipeline option groups shared by beam_dl pipelines.

Beam registers every *direct* `PipelineOptions` subclass in one argparse
parser, so: each flag is defined once, here, for all pipelines (two classes
adding `--input` collide as soon as both modules are imported); option groups
subclass `PipelineOptions` directly; and no flag is `required=True` (that
would make every Beam job need it). Pipelines call `require()` instead,
which fails before the job starts with a clear message.
"""

from __future__ import annotations

import argparse
import re
from typing import Iterable

from apache_beam.options.pipeline_options import PipelineOptions


class OptionsError(ValueError):
  """A missing or invalid pipeline option, named with what to pass."""


SWITCH_VALUES = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}


def switch(text: str) -> bool:
  """argparse `type=` for on/off flags that also take a value.

  Use with `nargs='?', const=True, default=False`: `--forecast` and
  `--forecast=true` turn it on, `--forecast=false` off. A Flex Template
  launcher passes every parameter as `--name=value`, which a store_true flag
  refuses, so on/off flags of templated pipelines are switches.
  """
  try:
    return SWITCH_VALUES[str(text).strip().lower()]
  except KeyError:
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}') from None


def positive_int(text: str) -> int:
  """argparse `type=` for counts and sizes: 1 or more, else a clear error.

  argparse reports it as "argument --max_batch_size: expected a positive
  integer, got '0'" before the job starts (Dataflow templates check the same
  with the regex in pipelines/templates/*.json).
  """
  try:
    value = int(text)
  except (TypeError, ValueError):
    value = 0
  if value < 1 or str(text).strip() != str(value):
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
  return value


def non_negative_int(text: str) -> int:
  """argparse `type=` for counts where 0 means none or all: 0 or more."""
  try:
    value = int(text)
  except (TypeError, ValueError):
    value = -1
  if value < 0 or str(text).strip() != str(value):
    raise argparse.ArgumentTypeError(f'expected an integer of 0 or more, got {text!r}')
  return value


class IOOptions(PipelineOptions):
  """Where a pipeline reads and writes."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--input', default=None, help='Input file pattern (format depends on the pipeline).')
    parser.add_argument(
      '--input_format',
      default='auto',
      help="Input format; 'auto' infers it from the pattern (pipelines list their formats).",
    )
    parser.add_argument('--output', default=None, help='Output path prefix for JSON-lines results and dead letters.')


def error_rate(text: str) -> float:
  """argparse `type=` for an error rate: a fraction in [0, 1]."""
  try:
    value = float(text)
  except (TypeError, ValueError):
    value = -1.0
  if not 0 <= value <= 1:
    raise argparse.ArgumentTypeError(f'expected a fraction between 0 and 1, got {text!r}')
  return value


class DeadLetterOptions(PipelineOptions):
  """When dead letters fail the job (Beam's with_exception_handling threshold)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
      '--max_error_rate',
      type=error_rate,
      default=None,
      help='Fail the job, with one line saying how many inputs failed, when more than this '
      'fraction of inputs (0-1) become dead letters (default: never fail for bad inputs).',
    )


class ProgressOptions(PipelineOptions):
  """Progress lines for long local runs."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
      '--progress_every_secs',
      type=float,
      default=0,
      help='Log inputs read so far and their rate every this many seconds (0: off).',
    )


class InferenceOptions(PipelineOptions):
  """How RunInference loads, batches and computes; shared by scoring pipelines."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
      '--model_dir', default=None, help='A model directory written by beam_dl (spec.json + variables).'
    )
    parser.add_argument(
      '--max_batch_size', type=positive_int, default=256, help='Largest batch per model call (default 256).'
    )
    parser.add_argument(
      '--min_batch_size',
      type=positive_int,
      default=None,
      help='Smallest batch BatchElements forms before a bundle ends (default: --max_batch_size, full '
      "batches; Beam's adaptive sizing starts at 1 and, fooled by compile times, stays small).",
    )
    parser.add_argument(
      '--precision', choices=['float32', 'bfloat16'], default='float32', help='Compute precision (default float32).'
    )
    parser.add_argument(
      '--device', choices=['cpu', 'gpu', 'tpu'], default=None, help="JAX backend (default: JAX's default)."
    )
    parser.add_argument(
      '--dispatch_ahead',
      type=switch,
      nargs='?',
      const=True,
      default=True,
      help='true (default): the inference step dispatches batch k before emitting batch k-1, so the '
      "bundle's other work overlaps the model (transforms.inference._DispatchAheadDoFn); false: read "
      "each batch's outputs before the next batch is dispatched (Beam's own RunInference step).",
    )

  def handler_kwargs(self) -> dict:
    return {
      'max_batch_size': self.max_batch_size,
      'min_batch_size': self.min_batch_size,  # None: the handler's default, full batches
      'precision': self.precision,
      'device': self.device,
    }


def require(options: PipelineOptions, *names: str) -> None:
  """Raises OptionsError naming every flag in `names` that was not given."""
  values = options.get_all_options()
  missing = [f'--{n}' for n in names if values.get(n) in (None, '')]
  if missing:
    raise OptionsError(f'missing required option(s): {", ".join(missing)}')


def check_choice(options: PipelineOptions, name: str, choices: Iterable[str]) -> str:
  """The value of --name if it is one of `choices`, else OptionsError listing them.

  For flags whose choices depend on another flag (argparse `choices=` can't
  express that); returns None unchanged when the flag was not given.
  """
  value = options.get_all_options().get(name)
  allowed = tuple(choices)
  if value is not None and value not in allowed:
    raise OptionsError(f'--{name} must be one of {", ".join(allowed)}; got {value!r}')
  return value


def check_pattern(options: PipelineOptions, name: str, pattern: str, expected: str) -> str:
  """The value of --name if it fully matches regex `pattern`, else OptionsError.

  `expected` says in words what a valid value looks like (e.g. "a gs:// path")
  and goes into the message. Returns None unchanged when the flag was not given.
  """
  value = options.get_all_options().get(name)
  if value is not None and not re.fullmatch(pattern, str(value)):
    raise OptionsError(f'--{name} must be {expected}; got {value!r}')
  return value


class DriftOptions(PipelineOptions):
  """Data drift against a reference profile (`transforms.drift`), for scoring pipelines."""

  @classmethod
  def _add_argparse_args(cls, parser):
    add = parser.add_argument
    add(
      '--drift_profile',
      default=None,
      help='Reference profile (drift_profile.json, or a directory holding one): compute PSI and '
      'Jensen-Shannon per feature and prediction; writes <output>_drift-*.jsonl and '
      '<output>_alerts-*.jsonl. Default (batch): a sample of the images or events is checked against '
      'the input profile training saved in the model directory (a metric and one warning line if they '
      'drift); `none`: no check.',
    )
    add(
      '--write_drift_profile',
      default=None,
      help='Build a reference profile from this run (e.g. over training or held-out data) and '
      'write it to this path, from the same features the comparison uses.',
    )
    add(
      '--drift_window_size',
      type=float,
      default=None,
      help='Drift window, seconds of event time (default: the whole run in batch; the scoring window in streaming).',
    )
    add('--drift_window_period', type=float, default=None, help='Sliding drift window step, seconds.')
    add('--drift_warn_psi', type=float, default=0.1, help="PSI from which a feature is 'moderate' (default 0.1).")
    add(
      '--drift_alert_psi',
      type=float,
      default=0.25,
      help="PSI from which a feature is 'significant' and alerts (default 0.25).",
    )
    add('--drift_bins', type=positive_int, default=10, help='Quantile bins per feature of a written profile.')
    add(
      '--drift_min_count',
      type=positive_int,
      default=20,
      help='Features with fewer values in a window are not judged (default 20).',
    )


class MetricsOptions(PipelineOptions):
  """Exporting a run's Beam metrics to Prometheus (`beam_dl.operations.metrics_export`)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    add = parser.add_argument
    add(
      '--metrics_port',
      type=int,
      default=None,
      help='Serve the Beam metrics in Prometheus text format on this port (0: any free port) while the job runs.',
    )
    add('--metrics_address', default='127.0.0.1', help='Address the metrics endpoint binds (default 127.0.0.1).')
    add('--metrics_poll_secs', type=float, default=5.0, help="Seconds between reads of the running job's metrics.")
    add(
      '--metrics_linger_secs',
      type=float,
      default=0.0,
      help='After the job ends, keep serving until the final values were scraped once, or this many seconds passed.',
    )
    add(
      '--metrics_pushgateway',
      default=None,
      help='Push the final metrics to this Prometheus Pushgateway (host:port) when the job ends.',
    )
    add('--metrics_job', default=None, help='Pushgateway job name (default: the pipeline module).')


class JobServerOptions(PipelineOptions):
  """Options of Beam's Java job servers (Flink, Spark) that a Python pipeline passes through by name.

  Declared so that every pipeline's command line accepts them (beam_dl
  refuses unknown flags) and Beam sends them with the job.
  """

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
      '--pipeline_resources_detector_factory_class',
      default=None,
      help='Flink/Spark job servers: the Java PipelineResourcesDetector.Factory that picks the jars staged with '
      'each job (Beam: the whole job-server classpath). beam_dl.runners.NoJarsToStage (built by make runners) '
      "stages none, for clusters whose JVMs already hold Beam's classes: the clusters of beam_dl.services.",
    )
    parser.add_argument(
      '--savepoint_path',
      default=None,
      help='Flink: start the job from this savepoint (a job stopped with one: flink stop, or '
      'FlinkCluster.stop_with_savepoint); its Kafka offsets, windows and state carry over.',
    )
