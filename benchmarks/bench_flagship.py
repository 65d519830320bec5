"""The flagship pipeline end to end vs a plain Python loop, same images and model.

  plain loop      sorted paths -> read bytes -> decode_image (Pillow decode +
                  resize, the library's own) -> stack 128 -> jitted forward,
                  batch k+1 dispatched before batch k's result is read
  pipeline        pipelines.classify_images.run([...]) on the DirectRunner, timed
                  from pipeline construction to the last output file written
                  (model load, compiles and start-up included, like a user's run)

Both see the same generated 64x64 PNG/JPEG files (a set of distinct files in
one folder, the other folders hard links to its files, so N images cost N/folders
files) and the same Flax SmallCNN (features 32/64/128) saved as a beam_dl
model directory, batch 128. Prints both rates, the ratio and whether every
prediction (label per key) matches the loop's. Modes:

  single     the default DirectRunner (one in-process worker)
  mp2        --direct_num_workers=2 --direct_running_mode=multi_processing
  mt2        --direct_num_workers=2 --direct_running_mode=multi_threading
  ray        the same job written with Ray Data (benchmarks/ray_flagship.py),
             in the interpreter `make ray-venv` builds (--ray_python)

    python -m benchmarks.bench_flagship --num 24000 --modes single,mp2,mt2
    python -m benchmarks.bench_flagship --num 24000 --modes single,ray --repeats 3
    python -m benchmarks.bench_flagship --num 8000 --profile 30   # cProfile top 30, and Python calls per input

`main CPU` is the CPU time of the calling thread: the loop's decodes, and
the single-worker pipeline's bundle thread (every Beam step, the model call
and its wait-free parts), the part that does not overlap the forward pass.
Unlike wall time it holds up on a loaded machine.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np

SIZE = 64
BATCH = 128
MODES = {
  'single': [],
  'mp2': ['--direct_num_workers=2', '--direct_running_mode=multi_processing'],
  'mt2': ['--direct_num_workers=2', '--direct_running_mode=multi_threading'],
}


def make_images(root: str, num: int, folders: int = 12, seed: int = 0) -> str:
  """`num` images under root/fNN/: num/folders distinct files in f00 (half PNG,
  half JPEG, smooth gradients + noise so they compress like photos), the
  other folders hard links to them (Beam's local match does not follow
  symlinked folders). Returns the glob pattern."""
  from PIL import Image

  per_folder = -(-num // folders)
  first = os.path.join(root, 'f00')
  os.makedirs(first, exist_ok=True)
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  for i in range(per_folder):
    base = xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4) + rng.uniform(0, 255, 3)[:, None, None]
    pixels = (base.transpose(1, 2, 0) + rng.normal(0, 12, (SIZE, SIZE, 3))) % 256
    image = Image.fromarray(pixels.astype(np.uint8))
    ext = 'png' if i % 2 == 0 else 'jpg'
    image.save(os.path.join(first, f'{i:06d}.{ext}'))
  names = sorted(os.listdir(first))
  for f in range(1, folders):
    folder = os.path.join(root, f'f{f:02d}')
    os.makedirs(folder, exist_ok=True)
    for name in names:
      if not os.path.exists(os.path.join(folder, name)):
        os.link(os.path.join(first, name), os.path.join(folder, name))
  return os.path.join(root, 'f*', '*')


def make_model(workdir: str) -> str:
  """SmallCNN features 32/64/128 on 64x64x3 uint8, seeded weights, msgpack."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from beam_dl.models import checkpoints

  spec = checkpoints.ModelSpec(
    name='small_cnn',
    kwargs={'num_classes': 10, 'features': [32, 64, 128], 'hidden': 128},
    input_shape=(SIZE, SIZE, 3),
    input_dtype='uint8',
    input_scale=1 / 255,
  )
  variables = nn.meta.unbox(spec.build().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))
  return checkpoints.save(os.path.join(workdir, 'model'), spec, variables, fmt='msgpack')


def plain_loop(model_dir: str, pattern: str, batch: int = BATCH) -> tuple[float, dict]:
  """(seconds, {path: label}) for the hand-written loop, model load and compile included."""
  import jax

  from beam_dl.decoding.images import ImageSpec, decode_image
  from beam_dl.models import checkpoints

  start = time.perf_counter()
  spec, variables = checkpoints.load(model_dir)
  module = spec.build()
  forward = jax.jit(lambda v, x: module.apply(v, spec.normalize(x)))
  image_spec = ImageSpec(height=SIZE, width=SIZE, channels=3)
  paths = sorted(glob.glob(pattern))
  labels, pending = {}, None

  def collect(item):
    keys, out = item
    labels.update(zip(keys, np.asarray(out).argmax(axis=1).tolist()))

  for i in range(0, len(paths), batch):
    keys = paths[i : i + batch]
    arrays = []
    for path in keys:
      with open(path, 'rb') as f:
        arrays.append(decode_image(f.read(), image_spec))
    out = forward(variables, np.stack(arrays))
    if pending is not None:
      collect(pending)
    pending = (keys, out)
  collect(pending)
  return time.perf_counter() - start, labels


RAY_PYTHON = os.path.expanduser('~/.cache/beam_dl/ray-venv/bin/python')


def ray_data(model_dir: str, pattern: str, workdir: str, python: str) -> tuple[float, dict, float]:
  """(seconds, labels, ray.init seconds) for benchmarks.ray_flagship, run by `python`."""
  labels_path = os.path.join(workdir, 'ray-labels.json')
  done = subprocess.run(
    [
      python,
      '-m',
      'benchmarks.ray_flagship',
      '--model_dir',
      model_dir,
      '--pattern',
      pattern,
      '--batch',
      str(BATCH),
      '--labels',
      labels_path,
    ],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    check=False,
  )
  if done.returncode:
    raise RuntimeError(f'ray_flagship failed ({done.returncode}):\n{done.stderr[-3000:]}')
  result = json.loads(done.stdout.strip().splitlines()[-1])
  with open(labels_path) as f:
    return result['seconds'], json.load(f), result['init_seconds']


def pipeline_labels(output: str) -> tuple[dict, int]:
  """({key: label} from the prediction files, number of dead letters)."""
  labels = {}
  for path in glob.glob(f'{output}-[0-9]*-of-*.jsonl'):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        labels[record['key']] = record['label']
  failed = 0
  for path in glob.glob(f'{output}_failed-*.jsonl'):
    with open(path) as f:
      failed += sum(1 for _ in f)
  return labels, failed


def run_pipeline(
  model_dir: str, pattern: str, output: str, extra: list[str], profile: int = 0
) -> tuple[float, dict, int, dict]:
  """(seconds, labels, dead letters, batch-size stats) for classify_images.run."""
  from apache_beam.metrics.metric import MetricsFilter

  from pipelines import classify_images

  argv = ['--input', pattern, '--model_dir', model_dir, '--output', output, '--max_batch_size', str(BATCH), *extra]
  profiler = cProfile.Profile() if profile else None
  start = time.perf_counter()
  if profiler:
    profiler.enable()
  result = classify_images.run(argv)
  if profiler:
    profiler.disable()
  seconds = time.perf_counter() - start
  profile_stats = None
  if profiler:
    text = io.StringIO()
    profile_stats = pstats.Stats(profiler, stream=text)
    profile_stats.sort_stats('cumulative').print_stats(profile)
    print(text.getvalue())
  stats = {}
  try:
    for dist in result.metrics().query(MetricsFilter())['distributions']:
      if dist.key.metric.name in ('batch_size', 'padding_percent'):
        d = dist.committed
        stats[dist.key.metric.name] = (d.count, d.min, d.mean, d.max)
    for counter in result.metrics().query(MetricsFilter())['counters']:
      if counter.key.metric.name == 'jit_compiles':
        stats['jit_compiles'] = stats.get('jit_compiles', 0) + counter.committed
  except Exception as e:  # metrics are a diagnostic here, not the result
    stats['metrics_error'] = str(e)
  labels, failed = pipeline_labels(output)
  if profile_stats:  # the host's speed does not move this one: a measure of per-image work
    print(
      f'Python calls in the run: {profile_stats.total_calls:,}, '
      f'{profile_stats.total_calls / max(1, len(labels) + failed):.0f} per input'
    )
  return seconds, labels, failed, stats


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num', type=int, default=24000, help='images (rounded up to a multiple of --folders)')
  parser.add_argument('--folders', type=int, default=12)
  parser.add_argument('--modes', default='single,mp2', help=f'comma-separated of {sorted(MODES)}')
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--profile', type=int, default=0, help='cProfile the single-worker run, print top N')
  parser.add_argument('--workdir', default=None, help='keep images/model here (default: a temp dir)')
  parser.add_argument('--extra', default='', help='extra pipeline flags, space-separated')
  parser.add_argument('--ray_python', default=RAY_PYTHON, help='interpreter with Ray Data for the ray mode')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    pattern = make_images(os.path.join(workdir, 'images'), args.num, args.folders)
    model_dir = make_model(workdir)
    total = len(glob.glob(pattern))
    print(
      f'{total} images ({SIZE}x{SIZE} PNG/JPEG, {args.folders} folders), SmallCNN 32/64/128, batch {BATCH}, '
      f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}'
    )
    ratios: dict[str, list[float]] = {mode: [] for mode in args.modes.split(',')}
    for repeat in range(args.repeats):
      cpu0, main0 = time.process_time(), time.thread_time()
      loop_s, loop_labels = plain_loop(model_dir, pattern)
      loop_cpu, loop_main = time.process_time() - cpu0, time.thread_time() - main0
      loop_rate = total / loop_s
      print(
        f'run {repeat + 1}: plain loop {loop_rate:8.1f} img/s ({loop_s:.1f} s, {loop_cpu:.1f} CPU s in this process, '
        f'main CPU {loop_main:.1f} s) | load average {os.getloadavg()[0]:.1f}'
      )
      for mode in args.modes.split(','):
        if mode == 'ray':
          seconds, labels, init_seconds = ray_data(model_dir, pattern, workdir, args.ray_python)
          rate = total / seconds
          print(
            f'  ray    Ray Data {rate:8.1f} img/s ({seconds:.1f} s; ray.init {init_seconds:.1f} s more, not '
            f'counted) | ratio {rate / loop_rate:.3f} of the loop | labels {len(labels)}, match the loop: '
            f'{labels == loop_labels}'
          )
          ratios[mode].append(rate / loop_rate)
          continue
        output = os.path.join(workdir, f'out-{mode}-{repeat}', 'predictions')
        shutil.rmtree(os.path.dirname(output), ignore_errors=True)  # a fresh output, as a first run writes
        cpu0, main0 = time.process_time(), time.thread_time()
        seconds, labels, failed, stats = run_pipeline(
          model_dir, pattern, output, MODES[mode] + args.extra.split(), args.profile if mode == 'single' else 0
        )
        cpu = time.process_time() - cpu0  # worker processes (mp2) not included
        main = time.thread_time() - main0
        rate = total / seconds
        match = labels == loop_labels
        print(
          f'  {mode:6s} pipeline {rate:8.1f} img/s ({seconds:.1f} s, {cpu:.1f} CPU s, main CPU {main:.1f} s) '
          f'| ratio {rate / loop_rate:.3f} of the loop '
          f'| predictions {len(labels)} + {failed} dead letters, match the loop: {match} | {stats}'
        )
        ratios[mode].append(rate / loop_rate)
    if args.repeats > 1:
      print(
        'median ratio of the loop over',
        args.repeats,
        'runs:',
        ', '.join(f'{mode} {statistics.median(values):.3f}' for mode, values in ratios.items()),
      )


if __name__ == '__main__':
  main()
