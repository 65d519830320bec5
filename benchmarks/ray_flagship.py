"""The flagship job written with Ray Data: what a user might pick instead of Beam.

    read_binary_files(paths) -> map(decode_image) -> map_batches(actor pool of
    one, the same jitted model, batch 128) -> labels collected in the driver

The same images, the library's own decoder (Pillow decode + resize, as the
plain loop and the pipeline use) and the same model directory as
bench_flagship's other sides; it is that benchmark's `ray` mode, run in its own
interpreter (`make ray-venv`: Ray Data next to the project's pins, kept out of
the project's environment). Timed from the Dataset's construction to the
last label in the driver, model load and compile included; the Ray cluster's
start (`ray.init`) is printed apart and left out, and nothing is written to
files (Beam's side writes JSON lines), both in Ray's favour.

    python -m benchmarks.ray_flagship --model_dir M --pattern 'images/f*/*' --labels out.json

Prints one JSON line: {"seconds", "init_seconds", "images"}; writes
{path: label} to --labels.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np


class _Classifier:
  """The actor: the model loaded and jitted once, a batch of decoded images in, labels out."""

  def __init__(self, model_dir: str):
    import jax

    from beam_dl.models import checkpoints

    spec, self._variables = checkpoints.load(model_dir)
    module = spec.build()
    self._forward = jax.jit(lambda v, x: module.apply(v, spec.normalize(x)))

  def __call__(self, batch: dict) -> dict:
    logits = self._forward(self._variables, np.stack(batch['image']))
    return {'path': batch['path'], 'label': np.asarray(logits).argmax(axis=1)}


def run(model_dir: str, pattern: str, batch: int) -> tuple[float, float, dict]:
  """(seconds, ray.init seconds, {path: label})."""
  import ray

  from beam_dl.decoding.images import ImageSpec, decode_image
  from beam_dl.models import checkpoints

  height, width, channels = checkpoints.load_spec(model_dir).input_shape
  image_spec = ImageSpec(height=height, width=width, channels=channels)

  def decode(row: dict) -> dict:
    return {'path': row['path'], 'image': decode_image(row['bytes'], image_spec)}

  start = time.perf_counter()
  ray.init(
    num_cpus=os.cpu_count(),
    include_dashboard=False,
    log_to_driver=False,
    object_store_memory=1 << 30,
    configure_logging=False,
  )
  init_seconds = time.perf_counter() - start
  ray.data.DataContext.get_current().enable_progress_bars = False
  start = time.perf_counter()
  paths = sorted(glob.glob(pattern))
  dataset = (
    ray.data.read_binary_files(paths, include_paths=True)
    .map(decode)
    .map_batches(_Classifier, fn_constructor_args=(model_dir,), batch_size=batch, concurrency=1, batch_format='numpy')
  )
  labels = {}
  for out in dataset.iter_batches(batch_size=None, batch_format='numpy'):
    labels.update(zip(out['path'].tolist(), out['label'].tolist()))
  seconds = time.perf_counter() - start
  ray.shutdown()
  return seconds, init_seconds, labels


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--pattern', required=True)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--labels', required=True, help='where to write {path: label}')
  args = parser.parse_args(argv)
  seconds, init_seconds, labels = run(args.model_dir, args.pattern, args.batch)
  with open(args.labels, 'w') as f:
    json.dump(labels, f)
  print(json.dumps({'seconds': seconds, 'init_seconds': init_seconds, 'images': len(labels)}))


if __name__ == '__main__':
  main()
