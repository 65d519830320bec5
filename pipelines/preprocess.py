"""Preprocess raw records with tf.Transform: analyse once, write training records.

    python -m pipelines.preprocess --preprocess_kind images \
        --input 'demo_out/images/train/*' --preprocess_image_shape 8,8,1 \
        --transform_dir out/transform --output out/transformed/train [Beam flags]

    python -m pipelines.preprocess --preprocess_kind sequences \
        --input 'events/*.jsonl' --preprocess_value_fields amount,duration \
        --preprocess_id_field item --preprocess_label_field label \
        --transform_dir out/transform --output out/transformed/train

Inputs (--input_format, default inferred from --input):
  images:    'files' (image files; label from a `_label<N>.` file-name part) or
             'tfrecord' (tf.Example with image/raw+image/shape or image/encoded)
  sequences: 'json' (JSON-lines events: key, time, value fields, id, label) or
             'sequence_example' (TFRecords of tf.train.SequenceExample)

Writes:
  <transform_dir>/transform_fn, transformed_metadata   the tf.Transform graph
  <transform_dir>/metadata                             the raw schema
  <transform_dir>/preprocess.json, stats.json          config; analysed statistics
  <output>-SSSSS-of-NNNNN.tfrecord                     transformed tf.Examples
  <output>_failed-SSSSS-of-NNNNN.jsonl                 dead letters
"""

from __future__ import annotations

import collections
import json
import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from beam_dl import beam_fixes, cli
from beam_dl.cli.options import IOOptions, OptionsError, require, switch
from beam_dl.core.deadletter import failed_output
from beam_dl.io.files import names_tfrecords
from beam_dl.preprocessing import config as config_lib
from beam_dl.preprocessing import preprocessing_fns, stats
from beam_dl.preprocessing.config import PreprocessConfig
from transforms import preprocessing as pp
from transforms.io import WriteJsonLines

_log = logging.getLogger('beam_dl.preprocess')
FORMATS = {'images': ('files', 'tfrecord'), 'sequences': ('json', 'sequence_example')}


class PreprocessOptions(PipelineOptions):
  """Flags of pipelines.preprocess (with --input/--input_format/--output of IOOptions)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--transform_dir', default=None, help='Where the tf.Transform graph and stats go.')
    parser.add_argument('--preprocess_kind', choices=config_lib.KINDS, default='images')
    parser.add_argument('--preprocess_image_shape', default='8,8,1', help='H,W,C images are decoded to.')
    parser.add_argument('--preprocess_scaling', choices=preprocessing_fns.SCALINGS, default='z_score')
    parser.add_argument('--preprocess_value_fields', default='', help='Comma-separated numeric event fields.')
    parser.add_argument('--preprocess_num_values', type=int, default=0, help='F of SequenceExample inputs.')
    parser.add_argument('--preprocess_id_field', default=None, help='Categorical id field of events.')
    parser.add_argument('--preprocess_key_field', default='key', help='Sequence key field of events.')
    parser.add_argument('--preprocess_time_field', default='time', help='Event time field of events.')
    parser.add_argument('--preprocess_label_field', default=None, help='Label field of events.')
    parser.add_argument(
      '--preprocess_with_ids',
      type=switch,
      nargs='?',
      const=True,
      default=False,
      help='SequenceExample inputs carry ids (--preprocess_with_ids or =true|false).',
    )
    parser.add_argument('--preprocess_length_buckets', type=int, default=4)
    parser.add_argument('--preprocess_shards', type=int, default=0, help='Output shards (0: runner decides).')


def input_format(kind: str, pattern: str, declared: str = 'auto') -> str:
  """The input format for `kind`: as declared, else from the pattern's extension."""
  allowed = FORMATS[kind]
  if declared != 'auto':
    if declared not in allowed:
      raise OptionsError(f'--input_format for {kind} must be one of {allowed} or auto, got {declared!r}')
    return declared
  if names_tfrecords(pattern):
    return allowed[1] if kind == 'images' else 'sequence_example'
  return 'files' if kind == 'images' else 'json'


def make_config(opts: PreprocessOptions, fmt: str) -> PreprocessConfig:
  value_fields = [f for f in opts.preprocess_value_fields.split(',') if f]
  if opts.preprocess_kind == 'sequences':
    num_values = len(value_fields) if fmt == 'json' else opts.preprocess_num_values
    if num_values < 1:
      raise OptionsError(
        '--preprocess_value_fields (json events) or --preprocess_num_values (SequenceExamples) is required'
      )
  else:
    num_values = 1
  with_ids = bool(opts.preprocess_id_field) if fmt == 'json' else opts.preprocess_with_ids
  try:
    shape = tuple(int(d) for d in opts.preprocess_image_shape.split(','))
    return PreprocessConfig(
      kind=opts.preprocess_kind,
      image_shape=shape,
      num_values=num_values,
      with_ids=with_ids,
      scaling=opts.preprocess_scaling,
      num_length_buckets=opts.preprocess_length_buckets,
    )
  except ValueError as e:
    raise OptionsError(str(e)) from None


def read_raw(pipeline, config: PreprocessConfig, fmt: str, pattern: str, opts: PreprocessOptions):
  """Reads `pattern` and makes canonical raw examples: (raw bytes, [failed])."""
  if fmt == 'files':
    from transforms.images import ReadImageFiles

    files = pipeline | 'ReadImageFiles' >> ReadImageFiles(pattern)
    raw = files.images | 'Canonical' >> pp.CanonicalImageFiles(config.image_shape)
    return raw.raw, [files.failed, raw.failed]
  if fmt == 'tfrecord':
    from transforms.tfrecords import ReadTFRecords

    records = pipeline | 'ReadRecords' >> ReadTFRecords(pattern)
    raw = records.records | 'Canonical' >> pp.CanonicalImageRecords(config.image_shape)
    return raw.raw, [records.failed, raw.failed]
  from transforms import sequences as seq

  if fmt == 'json':
    from beam_dl.formats.events import EventSpec

    spec = EventSpec(
      value_fields=tuple(f for f in opts.preprocess_value_fields.split(',') if f),
      key_field=opts.preprocess_key_field,
      time_field=opts.preprocess_time_field,
      id_field=opts.preprocess_id_field,
      label_field=opts.preprocess_label_field,
    )
    events = pipeline | 'ReadEvents' >> seq.ReadEvents(pattern, spec)
    assembled = events.events | 'AssembleSequences' >> seq.AssembleSequences()
    sequences, failures = assembled.sequences, [events.failed, assembled.failed]
  else:
    from beam_dl.formats.sequence_example import SequenceSpec

    read = pipeline | 'ReadSequenceExamples' >> seq.ReadSequenceExamples(
      pattern, SequenceSpec(num_features=config.num_values)
    )
    sequences, failures = read.parsed, [read.failed]
  raw = sequences | 'Canonical' >> pp.CanonicalSequences(config.num_values, config.with_ids)
  return raw.raw, failures + [raw.failed]


def write_raw_metadata(transform_dir: str, config: PreprocessConfig) -> None:
  """The raw schema where `tft.TFTransformOutput.raw_feature_spec()` reads it."""
  from tensorflow_transform.output_wrapper import TFTransformOutput
  from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io

  from beam_dl.preprocessing import schemas

  metadata = dataset_metadata.DatasetMetadata(schemas.schema_from_feature_spec(config.feature_spec()))
  metadata_io.write_metadata(
    metadata, beam.io.filesystems.FileSystems.join(transform_dir, TFTransformOutput.RAW_METADATA_DIR)
  )


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> PreprocessConfig:
  """Adds the preprocessing steps to `pipeline`; returns the config it wrote."""
  require(options, 'input', 'output', 'transform_dir')
  io, opts = options.view_as(IOOptions), options.view_as(PreprocessOptions)
  cli.require_matches(io.input)
  fmt = input_format(opts.preprocess_kind, io.input, io.input_format)
  config = make_config(opts, fmt)
  cli.require_writable(io.output)  # last: they make directories
  cli.require_writable(opts.transform_dir, 'transform_dir', directory=True)
  transform_dir = opts.transform_dir
  config_lib.save(transform_dir, config)
  write_raw_metadata(transform_dir, config)

  raw, failures = read_raw(pipeline, config, fmt, io.input, opts)
  import tensorflow_transform.beam as tft_beam

  temp_dir = beam.io.filesystems.FileSystems.join(transform_dir, 'tmp')
  transformed = raw | 'AnalyzeAndTransform' >> pp.AnalyzeAndTransform(config, temp_dir)
  transformed.transform_fn | 'WriteTransformFn' >> tft_beam.WriteTransformFn(transform_dir)
  transformed.instances | 'WriteTransformed' >> pp.WriteTransformedExamples(
    io.output, transformed.metadata, opts.preprocess_shards
  )
  (
    transformed.instances
    | 'ExtractStats' >> pp.ExtractStats()
    | 'WriteStats' >> beam.Map(lambda s: stats.write(transform_dir, s))
  )
  failed = failures | 'AllFailures' >> beam.Flatten() | 'CountDeadLetters' >> beam.Map(_count_dead_letter)
  failed | 'WriteFailures' >> WriteJsonLines(failed_output(io.output))
  return config


def _count_dead_letter(record: dict) -> dict:
  """Counts every dead letter written (of all stages: read, parse, decode...)."""
  Metrics.counter(pp.NAMESPACE, 'dead_letters').inc()
  return record


def report(transform_dir: str, config: PreprocessConfig) -> dict:
  """Adds vocabulary summaries to stats.json, logs every statistic, returns them."""
  import tensorflow_transform as tft

  analysed = stats.load(transform_dir)
  if config.kind == 'sequences' and config.with_ids:
    vocab = [
      t.decode('utf-8', 'replace')
      for t in tft.TFTransformOutput(transform_dir).vocabulary_by_name(preprocessing_fns.ITEM_VOCABULARY)
    ]
    analysed['vocabulary/item/size'] = [len(vocab)]
    analysed['vocabulary/item/top'] = vocab[:10]
    stats.write(transform_dir, analysed)
  for name, value in sorted(analysed.items()):
    _log.info('analysed %s = %s', name, value)
  return analysed


def run(argv=None):
  """Runs the pipeline to completion; returns (PipelineResult, analysed stats)."""
  options = cli.parse_options(
    argv, (IOOptions, PreprocessOptions), prog='python -m pipelines.preprocess', description=__doc__
  )
  pipeline = beam.Pipeline(options=options)
  config = build(pipeline, options)
  beam_fixes.log_active()
  start = time.perf_counter()
  result = pipeline.run()
  result.wait_until_finish()
  seconds = time.perf_counter() - start
  counters = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(pp.NAMESPACE))['counters']
  totals = collections.Counter()
  for counter in counters:
    # `result`: committed, or attempted where the runner reports no committed
    # values (Beam's portable Spark runner gives committed=None).
    totals[counter.key.metric.name] += counter.result or 0
  for name, value in sorted(totals.items()):
    _log.info('%s = %d', name, value)
  _log.info(
    'preprocessed %d examples (%d dead letters) in %.1f s: %.1f examples/s',
    totals['transformed_examples'],
    totals['dead_letters'],
    seconds,
    totals['transformed_examples'] / seconds,
  )
  transform_dir = options.view_as(PreprocessOptions).transform_dir
  temp_dir = beam.io.filesystems.FileSystems.join(transform_dir, 'tmp')
  if beam.io.filesystems.FileSystems.exists(temp_dir):
    beam.io.filesystems.FileSystems.delete([temp_dir])  # tf.Transform's scratch space
  return result, report(transform_dir, config)


def _main(argv):
  _, analysed = run(argv)
  print(json.dumps(analysed, indent=2, sort_keys=True))


if __name__ == '__main__':
  cli.main(_main, 'preprocess')
