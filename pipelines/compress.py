"""Post-training int8 quantization of a model dir: `python -m pipelines.compress`.

    python -m pipelines.compress --model_dir /tmp/digits/model --quantize int8 \
        --output /tmp/digits/model_int8 [--calibration 'data/train-*.tfrecord' | 'images/*.png'] \
        [--calibration_examples 256] [--activations static|dynamic|none] \
        [--method auto|qwix_ptq|weight_only] [--format msgpack|orbax]

The output is a normal beam_dl model directory (spec.json records the
quantization; variables hold int8 weights and float32 scales) that
`JaxModelHandler`, `ClassifyImages` and the pipelines serve as they are.
Static activation scales are calibrated on `--calibration_examples` examples
of `--calibration`: TFRecords (a pattern naming .tfrecord files), or image
files as `classify_images --input` takes them (a glob or an `@` file list,
decoded as classify_images decodes them); `--calibration_format` says which
when the name does not. Default: the training files recorded in the model
dir's spec. Prints a JSON summary (sizes, method, calibration).
See docs/compression.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def dir_bytes(path: str) -> int:
  """Bytes of all files under a local directory (a model dir's size on disk)."""
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


CALIBRATION_FORMATS = ('auto', 'tfrecord', 'files')


def calibration_inputs(spec, pattern: str = '', examples: int = 256, fmt: str = 'auto') -> list:
  """Calibration batches from `pattern` (default: the training files the spec
  records): TFRecords, or image files; `fmt` 'auto' decides by the name."""
  from beam_dl import cli
  from beam_dl.cli.options import OptionsError
  from beam_dl.compression import calibration as calib
  from beam_dl.io import files

  try:
    cfg, pattern, use_ids = calib.data_config(spec, pattern)
    cli.require_matches(pattern, 'calibration')
    if fmt == 'files' or (fmt == 'auto' and not files.names_tfrecords(pattern)):
      return calib.image_batches(spec, pattern, examples)
    return calib.calibration_batches(cfg, pattern, examples, use_ids=use_ids)
  except calib.CalibrationError as e:
    raise OptionsError(f'--calibration: {e}') from None


def compress(
  model_dir: str,
  output: str,
  *,
  method: str = 'auto',
  activations: str = 'static',
  calibration: str = '',
  calibration_examples: int = 256,
  fmt: str = 'msgpack',
  calibration_format: str = 'auto',
) -> dict:
  """Quantizes `model_dir` to `output`; returns a summary dict."""
  from beam_dl import cli
  from beam_dl.cli.options import OptionsError
  from beam_dl.compression import quantize
  from beam_dl.models import checkpoints

  spec, variables = checkpoints.load(model_dir)
  if spec.quantization:
    raise OptionsError(f'--model_dir {model_dir!r} is already quantized: {dict(spec.quantization)}')
  batches = []
  if activations == 'static' and method != 'weight_only':
    batches = calibration_inputs(spec, calibration, calibration_examples, calibration_format)
  cli.require_writable(output, directory=True)  # after the checks above: it makes the directory
  qspec, qvars = quantize.quantize(spec, variables, method=method, activations=activations, calibration=batches)
  checkpoints.save(output, qspec, qvars, fmt=fmt)
  before, after = dir_bytes(model_dir), dir_bytes(output)
  return {
    'model_dir': model_dir,
    'output': output,
    'quantization': dict(qspec.quantization),
    'format': fmt,
    'bytes_before': before,
    'bytes_after': after,
    'size_ratio': round(after / max(before, 1), 4),
  }


def parse_args(argv=None):
  from beam_dl import cli
  from beam_dl.cli.options import positive_int

  parser = cli.ArgumentParser(prog='python -m pipelines.compress', description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', required=True, help='float model dir to compress')
  parser.add_argument('--output', required=True, help='model dir to write')
  parser.add_argument('--quantize', default='int8', choices=['int8'])
  parser.add_argument('--method', default='auto', choices=['auto', 'qwix_ptq', 'weight_only'])
  parser.add_argument('--activations', default='static', choices=['static', 'dynamic', 'none'])
  parser.add_argument(
    '--calibration', default='', help='TFRecord or image-file glob (default: the training files in spec.json)'
  )
  parser.add_argument(
    '--calibration_format',
    default='auto',
    choices=CALIBRATION_FORMATS,
    help='auto (default): TFRecords if the pattern names .tfrecord files, else image files',
  )
  parser.add_argument('--calibration_examples', type=positive_int, default=256)
  parser.add_argument(
    '--format',
    default='msgpack',
    choices=['orbax', 'msgpack'],
    help='msgpack (default): one file, no orbax metadata overhead on small models',
  )
  parser.add_argument('--log_level', default='INFO', choices=['DEBUG', 'INFO', 'WARNING', 'ERROR'])
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level, format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  summary = compress(
    args.model_dir,
    args.output,
    method=args.method,
    activations=args.activations,
    calibration=args.calibration,
    calibration_examples=args.calibration_examples,
    fmt=args.format,
    calibration_format=args.calibration_format,
  )
  json.dump(summary, sys.stdout, indent=2)
  print()
  return summary


if __name__ == '__main__':
  from beam_dl import cli

  cli.main(main, 'compress', logs=False)
