"""Training throughput: input pipeline supply vs train-step demand, side by side.

    .venv/bin/python -m benchmarks.bench_training                      # CPU: tiny ResNet, 32x32
    .venv/bin/python -m benchmarks.bench_training --model resnet50 --batch 256 \
        --dtype bfloat16 --image_size 224                              # meant for a GPU

Writes random uint8 images as image TFRecords (the shared format the Beam
pipelines write), then measures, for the same global batch:

1. input pipeline: examples/s that tf.data parses and delivers as numpy
   batches (host only), and with the sharded `device_put` prefetch;
2. train step: examples/s the jitted, sharded train step consumes from a
   batch already on the devices (the accelerator's demand);
3. end to end: the real loop (pipeline -> prefetch -> step), with the
   fraction of time the step waited for input;
4. inference: examples/s of the jitted forward pass in eval mode.

The pipeline keeps the accelerator fed when (1) exceeds (2). Compilation is
excluded (a warm-up step runs first).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import jax
import numpy as np

from beam_dl.formats.image_example import encode_image_example
from beam_dl.training import datasets, input_pipeline
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig
from beam_dl.training.strategies import make_strategy


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet_tiny', help='registry name: resnet_tiny, resnet18, resnet50, small_cnn')
  p.add_argument('--batch', type=int, default=64, help='global batch')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--examples', type=int, default=0, help='synthetic examples written (default 4 batches)')
  p.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
  p.add_argument('--sharding', default='dp', choices=['dp', 'fsdp', 'tensor', 'fsdp_tensor', 'pmap'])
  p.add_argument('--workdir', default=None)
  return p.parse_args(argv)


def _rate(n_examples, seconds):
  return n_examples / seconds if seconds > 0 else float('nan')


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_training_')
  shape = (args.image_size, args.image_size, 3)
  n = args.examples or 4 * args.batch
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  records = [
    encode_image_example(f's/{i}', rng.integers(0, 256, shape, np.uint8), int(rng.integers(args.num_classes)))
    for i in range(n)
  ]
  pattern = datasets.write_shards(records, os.path.join(workdir, 'synthetic'), 8)
  write_s = time.perf_counter() - t0
  kwargs = {'num_classes': args.num_classes, 'dtype': args.dtype}
  cfg = TrainConfig(
    model=args.model,
    model_kwargs=kwargs,
    input_scale=1 / 255,
    data=DataConfig(
      kind='images', train_files=pattern, eval_files=pattern, shape=shape, shuffle_buffer=min(n, 1024), prefetch=2
    ),
    batch_size=args.batch,
    num_steps=10**9,
    optimizer='sgd',
    learning_rate=0.1,
    label_smoothing=0.1,
    sharding=ShardingConfig(mode=args.sharding, model_parallelism=2 if 'tensor' in args.sharding else 1),
  )
  strategy = make_strategy(cfg)
  local_batch = args.batch // jax.process_count()
  steps = args.steps

  # 1. input pipeline alone (host), then with the sharded device_put prefetch.
  ds = input_pipeline.make_dataset(cfg.data, pattern, local_batch, train=True, seed=0)
  it = ds.as_numpy_iterator()
  next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  host_rate = _rate(steps * args.batch, time.perf_counter() - t0)
  dev_it = input_pipeline.prefetch_to_mesh(ds.as_numpy_iterator(), strategy.put, 2)
  jax.block_until_ready(next(dev_it))
  t0 = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(next(dev_it))
  device_rate = _rate(steps * args.batch, time.perf_counter() - t0)

  # 2. train step alone on a resident batch (donated state, same batch).
  state = strategy.create_state()
  batch = strategy.put(next(it))
  t0 = time.perf_counter()
  state, metrics = strategy.train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = strategy.train_step(state, batch)
  jax.block_until_ready((state, metrics))
  step_rate = _rate(steps * args.batch, time.perf_counter() - t0)

  # 3. end to end: pipeline -> prefetch -> step.
  wait = 0.0
  t0 = time.perf_counter()
  for _ in range(steps):
    tw = time.perf_counter()
    b = next(dev_it)
    wait += time.perf_counter() - tw
    state, metrics = strategy.train_step(state, b)
  jax.block_until_ready((state, metrics))
  e2e_s = time.perf_counter() - t0
  e2e_rate = _rate(steps * args.batch, e2e_s)

  # 4. inference (eval mode forward).
  infer = strategy.eval_sums  # jitted forward + shard_map metric reduction
  jax.block_until_ready(infer(state, batch))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = infer(state, batch)
  jax.block_until_ready(out)
  infer_rate = _rate(steps * args.batch, time.perf_counter() - t0)

  dev = jax.devices()[0]
  print(
    f'\nbench_training: {args.model} {args.dtype} {shape[0]}x{shape[1]}x3 global batch {args.batch}, '
    f'{args.sharding} on {len(jax.devices())} x {dev.platform} ({dev.device_kind}); '
    f'{steps} timed steps; data: {n} synthetic examples ({write_s:.1f}s to write), compile {compile_s:.1f}s'
  )
  rows = [
    ('input pipeline (tf.data -> numpy)', host_rate),
    ('input pipeline + sharded device_put', device_rate),
    ('train step consumption (resident batch)', step_rate),
    ('end to end training (pipeline -> step)', e2e_rate),
    ('inference forward (eval mode)', infer_rate),
  ]
  width = max(len(r[0]) for r in rows)
  print(f'{"measurement":<{width}}  {"examples/s":>12}  {"per device":>12}')
  for name, rate in rows:
    print(f'{name:<{width}}  {rate:>12.1f}  {rate / len(jax.devices()):>12.1f}')
  verdict = 'keeps up' if device_rate >= step_rate else 'is the bottleneck'
  print(
    f'supply/demand = {device_rate / step_rate:.2f}x: the input pipeline {verdict}; '
    f'end-to-end input wait {100 * wait / e2e_s:.0f}% of step time'
  )
  return dict(rows)


if __name__ == '__main__':
  main()
