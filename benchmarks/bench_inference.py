"""RunInference overhead: JaxModelHandler on the DirectRunner vs the raw jitted loop.

The same model, the same pre-decoded uint8 images, the same batch size:

  raw loop      x[i:i+B] host slices -> jitted forward, batch k+1 dispatched
                before batch k's result is read (the best a hand-written loop does)
  RunInference  the images flow as single elements through BatchElements and
                JaxModelHandler on the DirectRunner, one PredictionResult each

The model is loaded and compiled before either is timed (the handler shares
that in-process copy with the pipeline), so both figures are steady-state
throughput; the pipeline figure includes Beam's start-up. CPU, here:

    python -m benchmarks.bench_inference --model small_cnn --batch 256 --num 16384
GPU (needs an accelerator; none on this machine):

    python -m benchmarks.bench_inference --model resnet50 --batch 256 --dtype bfloat16 --device gpu
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings

import numpy as np

MODELS = {
  # name: (ModelSpec kwargs, image size, channels)
  'small_cnn': ({'num_classes': 10, 'features': [64, 128], 'hidden': 256}, 32, 3),
  'resnet50': ({'num_classes': 1000}, 224, 3),
  'resnet_tiny': ({'num_classes': 10}, 32, 3),
  # almost no compute on ResNet-50-sized inputs: what the host path alone
  # (elements, batching, assembly, transfer) costs per image
  'linear': ({'num_outputs': 10}, 224, 3),
}


def build_model(name: str, workdir: str):
  """Saves the model with seeded random weights; returns (model_dir, spec)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from beam_dl.models import checkpoints

  kwargs, size, channels = MODELS[name]
  spec = checkpoints.ModelSpec(
    name=name, kwargs=kwargs, input_shape=(size, size, channels), input_dtype='uint8', input_scale=1 / 255
  )
  variables = nn.meta.unbox(spec.build().init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
  return checkpoints.save(os.path.join(workdir, name), spec, variables, fmt='msgpack'), spec


def raw_loop(model, images: np.ndarray, batch: int) -> float:
  """Seconds for the jitted forward over host slices, dispatching ahead."""
  start = time.perf_counter()
  previous = None
  for i in range(0, len(images), batch):
    out = model.forward(model.variables, images[i : i + batch])
    if previous is not None:
      np.asarray(previous)
    previous = out
  np.asarray(previous)
  return time.perf_counter() - start


def make_images(num: int, shape, seed: int = 0) -> np.ndarray:
  """The benchmark's pre-decoded inputs: seeded uint8 images, [num, *shape]."""
  return np.random.default_rng(seed).integers(0, 256, size=(num, *shape), dtype=np.uint8)


_MADE: dict = {}  # (num, shape) -> images, made once per process


def images_for(num: int, shape) -> np.ndarray:
  """The seeded images, made once per process: the raw loop and an
  in-process pipeline read the same array, so neither side's time includes
  making them (2.4 GB for 16,384 ResNet-50 inputs: seconds of RNG)."""
  key = (num, tuple(shape))
  if key not in _MADE:
    _MADE[key] = make_images(num, shape)
  return _MADE[key]


class _Images:
  """Emits the same images as single elements (views, no copies). Reads
  them from the process's cache (filled before timing, see `images_for`)
  rather than pickling the whole array into the pipeline."""

  def __init__(self, num, shape):
    self._num, self._shape = num, tuple(shape)

  def __call__(self, start_and_size):
    # by module name, not this file's globals: run as __main__, those would be
    # pickled by value into the pipeline, cache and all
    from benchmarks import bench_inference  # pylint: disable=import-outside-toplevel,import-self

    start, size = start_and_size
    return bench_inference.images_for(self._num, self._shape)[start : start + size]


def pipeline_run(handler, num: int, shape, batch: int, runner: str) -> tuple[float, int]:
  """Seconds for RunInference over `num` images as single elements; (seconds, outputs)."""
  import apache_beam as beam
  from apache_beam.metrics.metric import MetricsFilter
  from apache_beam.ml.inference.base import RunInference
  from apache_beam.options.pipeline_options import PipelineOptions

  counted = beam.metrics.Metrics.counter('bench', 'outputs')

  def count(_):
    counted.inc()

  start = time.perf_counter()
  pipeline = beam.Pipeline(runner=runner, options=PipelineOptions([]))
  _ = (
    pipeline
    | beam.Create([(i, batch) for i in range(0, num, batch)])
    | 'Examples' >> beam.FlatMap(_Images(num, shape))
    | RunInference(handler)
    | beam.Map(count)
  )
  result = pipeline.run()
  result.wait_until_finish()
  seconds = time.perf_counter() - start
  outputs = result.metrics().query(MetricsFilter().with_name('outputs'))['counters']
  return seconds, sum(c.committed for c in outputs)


def difference_per_image(long_run: float, short_run: float, extra_images: int) -> float:
  """(long_run - short_run) / extra_images: seconds per image with the
  start-up both runs pay cancelled. NaN (printed as nan, left out of the
  medians) when the difference is under a tenth of the long run: at tiny
  sizes the start-up's own noise is larger than the work, and a difference
  of two noisy start-ups is no rate (it came out negative)."""
  difference = long_run - short_run
  return difference / extra_images if difference > 0.1 * long_run else float('nan')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', choices=sorted(MODELS), default='small_cnn')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--num', type=int, default=16384, help='images per run')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument('--device', choices=['cpu', 'gpu', 'tpu'], default=None)
  parser.add_argument('--runner', default='DirectRunner')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)

  import jax

  from beam_dl.serving.handler import JaxModelHandler
  from benchmarks.bench_inference import images_for  # pylint: disable=import-self  (the cache _Images reads)

  with tempfile.TemporaryDirectory() as workdir:
    model_dir, spec = build_model(args.model, workdir)
    images = images_for(args.num, spec.input_shape)
    handler = JaxModelHandler(
      model_dir,
      max_batch_size=args.batch,
      min_batch_size=args.batch,
      batch_buckets=[args.batch],
      precision=args.dtype,
      device=args.device,
    )
    model = handler.load_model()  # held here: the pipeline's handler reuses this copy
    raw_loop(model, images[: args.batch * 2], args.batch)  # compile
    print(
      f'{args.model} batch {args.batch} {args.dtype} on {jax.devices(args.device)[0].platform}, '
      f'{args.num} images of {spec.input_shape} uint8, runner {args.runner}, {os.cpu_count()} CPUs'
    )
    small = max(args.batch, args.num // 4 // args.batch * args.batch)
    images_for(small, spec.input_shape)  # the short run's inputs too, before any timing
    rows, cpu = [], []
    for repeat in range(args.repeats):
      cpu0 = time.process_time()  # all threads of this process: XLA's and Beam's
      raw_s = raw_loop(model, images, args.batch)
      cpu1 = time.process_time()
      beam_s, outputs = pipeline_run(handler, args.num, spec.input_shape, args.batch, args.runner)
      cpu2 = time.process_time()
      small_s, small_outputs = pipeline_run(handler, small, spec.input_shape, args.batch, args.runner)
      cpu3 = time.process_time()
      # CPU seconds per image, start-up cancelled like the steady-state rate;
      # unlike wall time it does not depend on what else the machine runs
      cpu.append(((cpu1 - cpu0) / args.num, difference_per_image(cpu2 - cpu1, cpu3 - cpu2, args.num - small)))
      assert (outputs, small_outputs) == (args.num, small), (outputs, small_outputs)
      raw = args.num / raw_s
      end_to_end = args.num / beam_s
      steady = 1 / difference_per_image(beam_s, small_s, args.num - small)  # start-up cancels out
      rows.append((raw, end_to_end, steady))
      print(
        f'  run {repeat + 1}: raw loop {raw:8.1f} img/s | RunInference end to end {end_to_end:8.1f} img/s '
        f'({end_to_end / raw:.3f}) | steady state {steady:8.1f} img/s ({steady / raw:.3f}) | '
        f'CPU ms/img raw {1e3 * cpu[-1][0]:.3f} vs pipeline {1e3 * cpu[-1][1]:.3f} '
        f'(efficiency {cpu[-1][0] / cpu[-1][1]:.3f})'
      )
    rows = np.array(rows)
    warnings.filterwarnings('ignore', 'All-NaN slice', RuntimeWarning)  # every run too short: nan says so
    raw, end_to_end, steady = np.nanmedian(rows, axis=0)
    e2e_ratio = np.median(rows[:, 1] / rows[:, 0])  # per-run ratios: robust to a busy machine
    steady_ratio = np.nanmedian(rows[:, 2] / rows[:, 0])
    print(
      f'median: raw loop {raw:.1f} img/s | RunInference end to end {end_to_end:.1f} img/s | '
      f'steady state {steady:.1f} img/s | median per-run ratio: end to end {e2e_ratio:.3f}, '
      f'steady state {steady_ratio:.3f} of the raw loop'
    )
    cpu = np.array(cpu)
    print(
      f'CPU time per image (start-up cancelled): raw {1e3 * np.median(cpu[:, 0]):.3f} ms, pipeline '
      f'{1e3 * np.nanmedian(cpu[:, 1]):.3f} ms: the pipeline does {np.nanmedian(cpu[:, 0] / cpu[:, 1]):.3f} '
      "of the raw loop's work per CPU second"
    )
    again = model.predict_counted(images[: args.batch])[1].compiles  # counts are per call, not on the model
    print(f'compiles of a further batch: {again} (the pipeline reused the loaded, compiled model)')


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  main()
