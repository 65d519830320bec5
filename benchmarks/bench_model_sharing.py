"""Peak memory of 2 SDK worker processes, with and without model sharing.

A SmallCNN with a ~200 MB dense layer is saved to a temp dir; the same
RunInference pipeline runs on the DirectRunner with
--direct_num_workers=2 --direct_running_mode=multi_processing, once with a
plain JaxModelHandler (each worker loads its own copy) and once with
large_model=True (one multi_process_shared server process holds the model;
workers call it through a proxy). Each run is a fresh child process; its
whole process tree is sampled every 0.2 s: peak summed RSS and PSS
(proportional set size: shared pages split between processes, the fair
total), and the largest single process.

    python -m benchmarks.bench_model_sharing [--hidden 12288] [--num 2048]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

SIZE, CHANNELS = 32, 3


def save_big_model(model_dir: str, hidden: int) -> float:
  """SmallCNN whose dense layer is 4096 x hidden float32; returns MB of params."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from beam_dl.models import checkpoints

  spec = checkpoints.ModelSpec(
    name='small_cnn',
    kwargs={'num_classes': 10, 'features': [32, 64], 'hidden': hidden},
    input_shape=(SIZE, SIZE, CHANNELS),
    input_dtype='uint8',
    input_scale=1 / 255,
  )
  variables = nn.meta.unbox(spec.build().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, CHANNELS))))
  checkpoints.save(model_dir, spec, variables, fmt='msgpack')
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(variables)) / 1e6


class _Images:
  def __call__(self, start_and_size):
    start, size = start_and_size
    return np.random.default_rng(start).integers(0, 256, size=(size, SIZE, SIZE, CHANNELS), dtype=np.uint8)


def child(model_dir: str, large_model: bool, num: int, batch: int) -> None:
  """Runs the pipeline (in the measured process tree)."""
  import apache_beam as beam
  from apache_beam.ml.inference.base import RunInference
  from apache_beam.options.pipeline_options import PipelineOptions

  from beam_dl.serving.handler import JaxModelHandler

  handler = JaxModelHandler(model_dir, max_batch_size=batch, large_model=large_model)
  options = PipelineOptions(['--direct_num_workers=2', '--direct_running_mode=multi_processing'])
  with beam.Pipeline(runner='DirectRunner', options=options) as pipeline:
    counts = (
      pipeline
      | beam.Create([(i, batch) for i in range(0, num, batch)])
      | beam.Reshuffle()  # spread batches over both workers
      | 'Examples' >> beam.FlatMap(_Images())
      | RunInference(handler)
      | beam.combiners.Count.Globally()
    )
    counts | beam.Map(lambda n: print(f'predictions: {n}', flush=True))


def measure(cmd: list[str]) -> dict:
  """Runs cmd; samples its process tree's memory until it exits."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  root = psutil.Process(proc.pid)
  peak_rss = peak_pss = peak_one = 0
  most = 0
  while proc.poll() is None:
    try:
      tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
      break
    rss = pss = 0
    for p in tree:
      try:
        info = p.memory_full_info()
      except (psutil.NoSuchProcess, psutil.AccessDenied):
        continue
      rss += info.rss
      pss += info.pss
      peak_one = max(peak_one, info.rss)
    peak_rss, peak_pss, most = max(peak_rss, rss), max(peak_pss, pss), max(most, len(tree))
    time.sleep(0.2)
  output = proc.stdout.read()
  if proc.returncode != 0:
    raise RuntimeError(f'child failed ({proc.returncode}):\n{output[-3000:]}')
  return {'rss': peak_rss / 1e6, 'pss': peak_pss / 1e6, 'one': peak_one / 1e6, 'procs': most, 'output': output}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--hidden', type=int, default=12288, help='dense width: 4096*hidden*4 bytes')
  parser.add_argument('--num', type=int, default=2048)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--large_model', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args.child, args.large_model, args.num, args.batch)
    return
  with tempfile.TemporaryDirectory() as workdir:
    model_dir = os.path.join(workdir, 'big')
    megabytes = save_big_model(model_dir, args.hidden)
    print(
      f'model: SmallCNN hidden={args.hidden}, {megabytes:.0f} MB of float32 params (msgpack); '
      f'{args.num} images; DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing'
    )
    results = {}
    for label, flags in (('per-worker copies', []), ('large_model=True (shared)', ['--large_model'])):
      cmd = [
        sys.executable,
        '-m',
        'benchmarks.bench_model_sharing',
        '--child',
        model_dir,
        '--num',
        str(args.num),
        '--batch',
        str(args.batch),
        *flags,
      ]
      start = time.perf_counter()
      results[label] = r = measure(cmd)
      seconds = time.perf_counter() - start
      predictions = [line for line in r['output'].splitlines() if line.startswith('predictions')]
      print(
        f'  {label:27s} peak PSS {r["pss"]:7.0f} MB | peak RSS sum {r["rss"]:7.0f} MB | '
        f'largest process {r["one"]:6.0f} MB | {r["procs"]} processes | {seconds:5.1f} s | {predictions}'
      )
    plain, shared = results['per-worker copies'], results['large_model=True (shared)']
    print(
      f'sharing saves {plain["pss"] - shared["pss"]:.0f} MB PSS ({shared["pss"] / plain["pss"]:.2f}x of per-worker)'
    )


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  main()
