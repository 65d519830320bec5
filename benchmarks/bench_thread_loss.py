"""Elements lost by classify_images on several worker threads, with and without beam_dl's fix.

Writes FOLDERS x PER tiny PNGs, runs the flagship pipeline
(pipelines.classify_images.build) with a stateless model that takes ~1 ms
per image, and counts every input key in the outputs. `--unfixed` puts
Beam 2.77's own time-based flush back (beam_dl/beam_fixes/output_flush.py explains the
race); `--flush_ms` shortens the embedded SDK harness's 1 s flush interval
to make the race frequent.

    python benchmarks/bench_thread_loss.py --workdir /tmp/loss --per 2000 --workers 4 [--unfixed] [--flush_ms 1] [--switch_us 10]

Prints one line: inputs, predicted, dead letters, missing, duplicated, or
the error that failed the run (torn elements fail decoding, or allocate
tens of GB: run `--unfixed` under a memory limit, e.g. `prlimit --data=8G`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.test_threads import SPEC, SlowHandler  # noqa: E402  (the test's stand-in model)


def write_images(root: str, folders: int, per: int) -> list[str]:
  from PIL import Image

  rng = np.random.default_rng(0)
  paths = []
  for folder in range(folders):
    os.makedirs(os.path.join(root, f'f{folder:02d}'), exist_ok=True)
    for i in range(per):
      path = os.path.join(root, f'f{folder:02d}', f'{i:05d}.png')
      if not os.path.exists(path):
        Image.fromarray(rng.integers(0, 256, (6, 6), np.uint8)).save(path)
      paths.append(path)
  return paths


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--folders', type=int, default=12)
  parser.add_argument('--per', type=int, default=2000)
  parser.add_argument('--workers', type=int, default=4)
  parser.add_argument('--unfixed', action='store_true')
  parser.add_argument('--flush_ms', type=int, default=0)
  parser.add_argument('--switch_us', type=float, default=0, help='sys.setswitchinterval, in microseconds')
  args = parser.parse_args()

  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  from beam_dl.beam_fixes import output_flush
  from beam_dl.models import checkpoints
  from pipelines import classify_images
  from transforms import inference

  if args.unfixed:
    for name, method in output_flush.BEAM_METHODS.items():
      setattr(output_flush.STREAM, name, method)  # pylint: disable=protected-access
  if args.flush_ms:
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = args.flush_ms
  if args.switch_us:
    sys.setswitchinterval(args.switch_us / 1e6)
  write_images(os.path.join(args.workdir, 'images'), args.folders, args.per)
  inputs = glob.glob(f'{args.workdir}/images/*/*.png')  # what the pipeline reads
  model_dir = os.path.join(args.workdir, 'model')
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, checkpoints.SPEC_FILE), 'w') as f:
    f.write(SPEC.to_json())
  out = os.path.join(args.workdir, f'run-{os.getpid()}', 'pred')
  inference.JaxModelHandler = lambda *a, **k: SlowHandler()
  options = PipelineOptions(
    [
      f'--input={args.workdir}/images/*/*.png',
      f'--model_dir={model_dir}',
      f'--output={out}',
      f'--direct_num_workers={args.workers}',
      '--direct_running_mode=multi_threading',
    ]
  )
  start, error = time.time(), None
  try:
    with beam.Pipeline(options=options) as pipeline:
      classify_images.build(pipeline, options)
  except Exception as e:  # a torn element fails decoding: report it, as a loss
    error = f'{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}'
  keys = []
  for path in glob.glob(out + '-[0-9]*.jsonl'):
    with open(path) as f:
      keys += [json.loads(line)['key'] for line in f]
  failed = sum(1 for path in glob.glob(out + '_failed-*.jsonl') for _ in open(path))
  missing = len(set(inputs) - set(keys))
  print(
    f'{"unfixed" if args.unfixed else "fixed"} workers={args.workers} flush_ms={args.flush_ms or 1000} '
    f'inputs={len(inputs)} predicted={len(keys)} dead_letters={failed} missing={missing} '
    f'duplicated={len(keys) - len(set(keys))} secs={time.time() - start:.0f}' + (f' ERROR {error}' if error else '')
  )


if __name__ == '__main__':
  main()
