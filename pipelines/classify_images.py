"""Classify images with a Flax CNN: read -> decode -> RunInference -> JSON lines.

    python -m pipelines.classify_images \
        --input 'images/*.png' --model_dir model --output out/predictions \
        [--runner DirectRunner ...any Beam option]

Writes `<output>-SSSSS-of-NNNNN.jsonl` ({"key", "label", "score", "scores"})
and `<output>_failed-SSSSS-of-NNNNN.jsonl` ({"key", "stage", "reason"}):
every input lands in exactly one of them.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_dl import cli
from beam_dl.cli.options import (
  DeadLetterOptions,
  DriftOptions,
  InferenceOptions,
  IOOptions,
  MetricsOptions,
  OptionsError,
  ProgressOptions,
  require,
)
from beam_dl.core.deadletter import FailAboveErrorRate, failed_output
from beam_dl.io import files
from beam_dl.models import checkpoints
from beam_dl.operations import local_shards
from beam_dl.operations.metrics_export import run_pipeline
from beam_dl.operations.progress import CountProgressFn
from transforms.drift import classify_images_drift
from transforms.images import ReadImageExamples, ReadImageFiles
from transforms.inference import ClassifyImages
from transforms.io import WriteJsonLines
from transforms.metrics import CountDeadLetters

INPUT_FORMATS = ('auto', 'files', 'tfrecord')
# The flags `--help` lists (every Beam option is accepted as well).
OPTION_GROUPS = (
  IOOptions,
  InferenceOptions,
  DeadLetterOptions,
  ProgressOptions,
  DriftOptions,
  MetricsOptions,
  local_shards.LocalShardOptions,
)


def input_format(pattern: str, declared: str = 'auto') -> str:
  """'tfrecord' or 'files': as declared, else from the pattern's extension.

  --input is a glob of image files, or of TFRecord files of image
  tf.train.Example (`beam_dl.formats.image_example`): decoded pixels
  (image/raw + image/shape, as beam_dl writes them) or an encoded file
  (image/encoded), each with an optional key.
  """
  if declared not in INPUT_FORMATS:
    raise OptionsError(f'--input_format must be one of {INPUT_FORMATS}, got {declared!r}')
  if declared != 'auto':
    return declared
  return 'tfrecord' if files.names_tfrecords(pattern) else 'files'


def check_model(model_dir: str) -> None:
  """Loads the model once before the job starts: a directory that won't load
  (CheckpointError) or whose input is not an image is refused in one line
  here, not by every worker's setup with Beam's traceback."""
  spec, _ = checkpoints.load(model_dir)
  if len(spec.input_shape) != 3:
    raise OptionsError(f'--model_dir {model_dir!r}: model input {list(spec.input_shape)} is not an image [H, W, C]')


def build(pipeline: beam.Pipeline, options: PipelineOptions):
  """Adds the classification steps to `pipeline`; returns (predictions, failed)."""
  require(options, 'input', 'model_dir', 'output')
  io, inference = options.view_as(IOOptions), options.view_as(InferenceOptions)
  cli.require_matches(io.input)
  fmt = input_format(io.input, io.input_format)
  check_model(inference.model_dir)
  cli.require_writable(io.output)  # last: it makes the output's directory
  if fmt == 'tfrecord':
    read = pipeline | 'ReadImageExamples' >> ReadImageExamples(io.input)
  else:
    # Files are read on DecodeImages' decode thread, off the bundle's thread.
    read = pipeline | 'ReadImageFiles' >> ReadImageFiles(io.input, defer_read=True)
  images, failures = read.images, [read.failed]
  every = options.view_as(ProgressOptions).progress_every_secs
  if every > 0:
    images = images | 'Progress' >> beam.Map(CountProgressFn('classify_images: read', every))
  outputs = images | 'ClassifyImages' >> ClassifyImages(
    inference.model_dir, dispatch_ahead=inference.dispatch_ahead, **inference.handler_kwargs()
  )
  failed = (outputs.failed, *failures) | 'AllFailures' >> beam.Flatten()
  outputs.predictions | 'WritePredictions' >> WriteJsonLines(io.output)
  failed | 'WriteFailures' >> WriteJsonLines(failed_output(io.output))
  failed | 'CountDeadLetters' >> CountDeadLetters()
  max_error_rate = options.view_as(DeadLetterOptions).max_error_rate
  if max_error_rate is not None:
    failed | 'MaxErrorRate' >> FailAboveErrorRate((read.images, read.failed), max_error_rate)
  classify_images_drift(options, images, outputs.predictions, inference.model_dir, io.output)
  return outputs.predictions, failed


def run(argv=None):
  """Runs the pipeline to completion; returns Beam's PipelineResult (with --shard_files: a ShardsSummary)."""
  options = cli.parse_options(argv, OPTION_GROUPS, prog='python -m pipelines.classify_images', description=__doc__)
  if options.view_as(local_shards.LocalShardOptions).shard_files:  # large local jobs: one run per input shard
    io = options.view_as(IOOptions)
    return local_shards.run_in_shards(
      local_shards.module_runner('pipelines.classify_images'),
      argv,
      options,
      'classify_images',
      [f'--input_format={input_format(io.input, io.input_format)}'],
    )
  pipeline = beam.Pipeline(options=options)
  build(pipeline, options)
  return run_pipeline(pipeline, options, 'classify_images')


if __name__ == '__main__':
  cli.main(run, 'classify_images')
