"""classify_images throughput on every runner that executes here, side by side.

    .venv/bin/python -m benchmarks.bench_runners --images 2000
    .venv/bin/python -m benchmarks.bench_runners --images 100000 --runners direct \
        --clusters flink_cluster,spark_cluster --repeats 3

Writes N real digit images (scikit-learn digits, PNG and JPEG, cycled to N
files) plus the 2 broken files, trains the small CNN once (100 steps), then
runs `python -m pipelines.classify_images` unchanged on each runner of
tests/runner_matrix.py that runs here, one after another on the same inputs:
Direct, multi-process, portable, and Beam's FlinkRunner, SparkRunner and
PrismRunner after `make runners`; with `--clusters flink_cluster,spark_cluster`
also on the local Flink and Spark clusters of beam_dl.services (parallelism 2). Each run is a fresh process, as a user
would start it: wall seconds include interpreter start, imports and job
submission, which is exactly the per-job overhead a runner adds. The Flink
and Spark job servers are started (and timed) before their run, as the tests
share them; Prism starts inside its run. Also checks every runner wrote the
same predictions and dead letters as the first one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from tests import runner_matrix as rm
from tests.services import cluster_env


def write_inputs(directory: str, count: int) -> str:
  """`count` digit images cycled from all 1,797 digits, plus the 2 broken files."""
  from pipelines import demo

  x_train, x_test, y_train, y_test = demo.digit_images(seed=0)
  images = np.concatenate([x_train, x_test])
  labels = np.concatenate([y_train, y_test])
  index = np.arange(count) % len(images)
  folder = os.path.join(directory, 'images')
  demo.write_images(folder, images[index], labels[index])
  demo.write_broken_inputs(folder)
  train = demo.write_images(os.path.join(directory, 'train'), x_train[:300], y_train[:300])
  demo.train_model(train, os.path.join(directory, 'model'), steps=rm.CLASSIFY_STEPS)
  return folder


def _flink_cluster():
  from beam_dl.services import flink_cluster  # pylint: disable=g-import-not-at-top

  return flink_cluster.unavailable, flink_cluster.FlinkCluster


def _spark_cluster():
  from beam_dl.services import spark_cluster  # pylint: disable=g-import-not-at-top

  return spark_cluster.unavailable, spark_cluster.SparkCluster


# name -> (unavailable(), cluster class): the local clusters of beam_dl.services, at their defaults.
CLUSTERS = {'flink_cluster': _flink_cluster(), 'spark_cluster': _spark_cluster()}


@contextlib.contextmanager
def runner_flags(name: str, workdir: str):
  """The flags of runner-matrix runner or local cluster `name`, with what it needs running."""
  if name in CLUSTERS:
    cluster_class = CLUSTERS[name][1]
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    with cluster_class(workdir=os.path.join(workdir, name), env=cluster_env()) as cluster:
      yield cluster.runner_flags
    return
  runner = rm.RUNNERS[name]
  with rm.services_for(runner.needs, workdir) as services:
    yield runner.flags(services)


def import_seconds() -> float:
  """Interpreter start + importing the pipeline: the floor under every run."""
  log = os.path.join(tempfile.gettempdir(), 'bench_runners_import.log')
  return rm.run_pipeline('pipelines.classify_images', ['--help'], log).seconds


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--workdir', default=None, help='Default: a new temporary directory.')
  parser.add_argument(
    '--repeats',
    type=int,
    default=1,
    help='Runs per runner, its services (job server, cluster) up across them, as a session cluster '
    'serves job after job; the table gives the median and every run. The first job on a fresh '
    "cluster also pays its JVMs' warm-up.",
  )
  parser.add_argument('--runners', default=','.join(rm.RUNNERS), help='Comma-separated names from runner_matrix.')
  parser.add_argument(
    '--clusters',
    default='',
    help='Comma-separated: flink_cluster, spark_cluster. Also runs on those local clusters of '
    'beam_dl.services (2 TaskManagers / Workers, parallelism 2; make runners), started (and timed) before their run.',
  )
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error('--repeats must be at least 1')

  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_runners_')
  start = time.perf_counter()
  write_inputs(workdir, args.images)
  print(f'wrote {args.images} images + 2 broken files and trained the model in {time.perf_counter() - start:.1f} s')
  floor = import_seconds()
  print(f'interpreter start + pipeline imports: {floor:.1f} s')

  names = [n for n in args.runners.split(',') if n] + [n for n in args.clusters.split(',') if n]
  rows, reference = [], None
  for i, name in enumerate(names):
    reason = CLUSTERS[name][0]() if name in CLUSTERS else rm.RUNNERS[name].unavailable()
    if reason:
      print(f'[{i + 1}/{len(names)}] {name}: skipped ({reason})')
      continue
    out_dir = os.path.join(workdir, 'out', name)
    os.makedirs(out_dir, exist_ok=True)
    services_start = time.perf_counter()
    runs = []
    with runner_flags(name, workdir) as flags:
      services_s = time.perf_counter() - services_start
      argv = rm.classify_images_argv(workdir, out_dir) + flags
      for _ in range(args.repeats):
        shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        outcome = rm.run_pipeline('pipelines.classify_images', argv, os.path.join(out_dir, 'run.log'), timeout_s=3600)
        if outcome.returncode != 0:
          break
        runs.append(outcome.seconds)
    if outcome.returncode != 0:
      print(f'[{i + 1}/{len(names)}] {name}: FAILED (exit {outcome.returncode}); log {out_dir}/run.log')
      continue
    canonical = rm.read_classify_images(out_dir)
    same = True
    if reference is None:
      reference = canonical
    else:
      try:
        rm.compare_classify_images(canonical, reference)
      except AssertionError:
        same = False
    seconds = statistics.median(runs)
    row = {
      'runner': name,
      'seconds': seconds,
      'runs': runs,
      'images_per_second': args.images / seconds,
      'beyond_imports': seconds - floor,
      'predictions': len(canonical['predictions']),
      'dead_letters': len(canonical['failed']),
      'same_as_first': same,
      'services_s': services_s,
    }
    rows.append(row)
    elapsed = time.perf_counter() - start
    print(
      f'[{i + 1}/{len(names)}] {name}: {row["seconds"]:.1f} s, {row["images_per_second"]:.0f} images/s '
      f'(runs: {", ".join(f"{r:.1f}" for r in runs)} s) '
      f'({elapsed:.0f} s so far)',
      flush=True,
    )

  print(
    f'\nclassify_images, {args.images} images + 2 broken, one fresh process per run, 2-core machine'
    + (f'; median of {args.repeats} runs' if args.repeats > 1 else '')
  )
  first = rows[0] if rows else None
  print(
    f'{"runner":<20} {"wall s":>7} {"img/s":>7} {"vs " + (first["runner"] if first else ""):>14} '
    f'{"s beyond imports":>17} {"services s":>10} {"predictions":>11} {"dead":>5} same  runs s'
  )
  for r in rows:
    ratio = first['seconds'] / r['seconds']
    print(
      f'{r["runner"]:<20} {r["seconds"]:>7.1f} {r["images_per_second"]:>7.0f} {ratio:>13.2f}x '
      f'{r["beyond_imports"]:>17.1f} {r["services_s"]:>10.1f} {r["predictions"]:>11} {r["dead_letters"]:>5} '
      f'{"yes" if r["same_as_first"] else "NO":<4}  {" ".join(f"{x:.1f}" for x in r["runs"])}'
    )
  return rows


if __name__ == '__main__':
  main()
