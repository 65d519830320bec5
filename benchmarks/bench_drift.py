"""Drift's overhead per event: pipelines with and without --drift_profile, side by side.

    .venv/bin/python -m benchmarks.bench_drift [--images 2000] [--events 100000] [--repeats 3]

1. `pipelines.classify_images` over real digit images (scikit-learn digits
   cycled, PNG), with and without drift (which decodes each image a second
   time for its brightness/contrast, and bins the predicted class and score);
2. `pipelines.score_sequences` in batch over the Mauna Loa CO2 series
   (statsmodels, weekly, 12-week sliding windows, forecast scores), with and
   without drift on the co2 value and the score;
3. `ComputeDrift` alone: synthetic feature dicts (4 features) through a
   pipeline that only counts them vs one that computes drift, and the
   histogram binning without Beam.

Every pipeline runs on the FnApiRunner in this process, the two variants
alternating, `--repeats` times each; medians are reported. The first run of
each pipeline (JAX compilation, imports) is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from beam_dl.operations import drift
from transforms.drift import ComputeDrift


def _median_runs(run_a, run_b, repeats: int) -> tuple[float, float]:
  run_a(), run_b()  # warm-up
  a, b = [], []
  for _ in range(repeats):
    for fn, out in ((run_a, a), (run_b, b)):
      t0 = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t0)
  return statistics.median(a), statistics.median(b)


def _line(name: str, n: int, unit: str, without: float, with_drift: float) -> dict:
  overhead_us = (with_drift - without) / n * 1e6
  print(
    f'{name:<34} {n:>8} {unit:<7} without {without:7.2f} s ({n / without:9.0f}/s) | '
    f'with {with_drift:7.2f} s ({n / with_drift:9.0f}/s) | ratio {with_drift / without:5.2f} | '
    f'+{overhead_us:7.1f} us/{unit[:-1]}'
  )
  return {
    'name': name,
    'n': n,
    'without_s': round(without, 3),
    'with_s': round(with_drift, 3),
    'ratio': round(with_drift / without, 3),
    'overhead_us_per_item': round(overhead_us, 1),
  }


def bench_classify_images(workdir: str, n_images: int, repeats: int) -> dict:
  from PIL import Image

  from beam_dl.models import checkpoints
  from beam_dl.training.quick import fit_arrays
  from pipelines import classify_images, demo

  x_train, x_test, y_train, _ = demo.digit_images()
  spec = checkpoints.ModelSpec(
    name='small_cnn',
    kwargs={'num_classes': 10, 'features': [16, 32], 'hidden': 64},
    input_shape=demo.INPUT_SPEC_SHAPE,
    input_dtype='uint8',
    input_scale=1 / 255,
    labels=[str(d) for d in range(10)],
  )
  variables, _ = fit_arrays(spec, (x_train[..., None],), y_train, steps=100, learning_rate=3e-3)
  model = checkpoints.save(os.path.join(workdir, 'digits_model'), spec, variables)
  images = os.path.join(workdir, 'images')
  os.makedirs(images)
  for i in range(n_images):
    Image.fromarray(x_test[i % len(x_test)]).save(os.path.join(images, f'{i:05d}.png'))
  pixels = x_train.astype(np.float32) / 255
  profile = drift.save_profile(
    drift.build_profile({'image/brightness': pixels.mean(axis=(1, 2)), 'image/contrast': pixels.std(axis=(1, 2))}),
    os.path.join(workdir, 'digits_profile.json'),
  )
  base = ['--input', os.path.join(images, '*.png'), '--model_dir', model, '--runner', 'FnApiRunner']
  without = lambda: classify_images.run(base + ['--output', os.path.join(workdir, 'ci_plain', 'p')])
  with_drift = lambda: classify_images.run(
    base + ['--output', os.path.join(workdir, 'ci_drift', 'p'), '--drift_profile', profile]
  )
  return _line('classify_images (digits PNG)', n_images, 'images', *_median_runs(without, with_drift, repeats))


def bench_score_sequences(workdir: str, repeats: int) -> dict:
  from pipelines import score_sequences
  from pipelines import score_sequences_demo as demo

  times, values = demo.load_series()
  model = os.path.join(workdir, 'co2_model')
  demo.train_model(model, values, steps=20, cell='gru', pooling='last')
  events = os.path.join(workdir, 'co2.jsonl')
  with open(events, 'w') as f:
    for t, v in zip(times, values):
      f.write(json.dumps({'key': demo.KEY, 'time': float(t), 'co2': None if np.isnan(v) else float(v)}) + '\n')
  finite = values[np.isfinite(values)]
  profile = drift.save_profile(
    drift.build_profile({'co2': finite[: len(finite) // 2]}), os.path.join(workdir, 'co2_profile.json')
  )
  base = [
    '--input',
    events,
    '--model_dir',
    model,
    '--event_value_fields',
    'co2',
    '--window',
    'sliding',
    '--window_size',
    str(12 * demo.WEEK),
    '--window_period',
    str(demo.WEEK),
    '--seq_len',
    '12',
    '--forecast',
    '--min_length',
    '8',
    '--runner',
    'FnApiRunner',
  ]
  without = lambda: score_sequences.run(base + ['--output', os.path.join(workdir, 'ss_plain', 's')])
  with_drift = lambda: score_sequences.run(
    base + ['--output', os.path.join(workdir, 'ss_drift', 's'), '--drift_profile', profile]
  )
  return _line('score_sequences (CO2 events)', len(times), 'events', *_median_runs(without, with_drift, repeats))


def bench_compute_drift(workdir: str, n_events: int, repeats: int) -> list[dict]:
  rng = np.random.default_rng(0)
  columns = {f'f{i}': rng.normal(size=10_000) for i in range(4)}
  profile = drift.build_profile(columns)
  data = rng.normal(size=(n_events, 4))
  records = [{f'f{i}': float(v) for i, v in enumerate(row)} for row in data]

  def pipeline(with_drift: bool):
    def run():
      with beam.Pipeline(options=PipelineOptions(['--runner=FnApiRunner'])) as p:
        events = p | beam.Create(records, reshuffle=False)
        if with_drift:
          _ = events | ComputeDrift(profile)
        else:
          _ = events | beam.combiners.Count.Globally()

    return run

  out = [
    _line(
      'ComputeDrift vs Count (4 features)', n_events, 'events', *_median_runs(pipeline(False), pipeline(True), repeats)
    )
  ]
  t0 = time.perf_counter()
  hist = drift.Histograms(profile)
  for record in records:
    hist.add(record)
  drift.compare(profile, hist)
  plain = time.perf_counter() - t0
  print(
    f'{"Histograms.add + compare, no Beam":<34} {n_events:>8} events  {plain:7.2f} s '
    f'({n_events / plain:9.0f}/s) = {plain / n_events * 1e6:5.2f} us/event'
  )
  out.append(
    {
      'name': 'Histograms without Beam',
      'n': n_events,
      'seconds': round(plain, 3),
      'us_per_event': round(plain / n_events * 1e6, 2),
    }
  )
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--events', type=int, default=100_000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--skip', default='', help='comma-separated: classify,sequences,transform')
  args = parser.parse_args(argv)
  skip = set(args.skip.split(','))
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    if 'classify' not in skip:
      results.append(bench_classify_images(workdir, args.images, args.repeats))
    if 'sequences' not in skip:
      results.append(bench_score_sequences(workdir, args.repeats))
    if 'transform' not in skip:
      results.extend(bench_compute_drift(workdir, args.events, args.repeats))
  print(json.dumps(results))
  return results


if __name__ == '__main__':
  import logging

  logging.getLogger().setLevel(logging.WARNING)
  main()
