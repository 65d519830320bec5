"""Windowed feature extraction throughput: Beam vs plain numpy, side by side.

    .venv/bin/python -m benchmarks.bench_windowing [--events 200000] [--keys 100] [--repeats 2]

Synthetic events (keys x 2 features, event times uniform over one hour) go
through `WindowedFeatures` (60 s fixed windows: count, sum, mean, std, min,
max, last, rate) on the FnApiRunner with one worker (one core): the batch
path (numpy per key block, what batch pipelines get), the streaming path
with and without the late-data gate (the gate also with the SDK worker in a
subprocess, where Beam's state cache, and its objsize sizing, is off), and
through `WindowedSequences` (last 16 events).
Beside it: the same features computed with numpy over sorted arrays
(`np.lexsort` + `ufunc.reduceat`), the floor any Python-element pipeline pays
for. A generate-and-count pipeline shows Beam's own per-element cost.
Events/s are per core: every Beam figure is one SDK worker on one core.
"""
from __future__ import annotations

import argparse
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_dl.features import WindowSpec
from beam_dl.io.events import Event
from transforms.windowing import EventTimestamps, WindowedFeatures, WindowedSequences

WINDOW = 60.0
OUTPUTS = Metrics.counter('bench_windowing', 'outputs')
CHUNK = 10_000


def make_events(chunk: int, n: int, keys: int) -> list[Event]:
  rng = np.random.default_rng(chunk)
  k = rng.integers(0, keys, n)
  t = rng.uniform(0, 3600, n)
  v = rng.normal(size=(n, 2))
  return [Event(f'k{a}', float(b), (float(c), float(d))) for a, b, (c, d) in zip(k, t, v)]


def arrays(total: int, keys: int):
  ks, ts, vs = [], [], []
  for chunk in range(total // CHUNK):
    rng = np.random.default_rng(chunk)
    ks.append(rng.integers(0, keys, CHUNK))
    ts.append(rng.uniform(0, 3600, CHUNK))
    vs.append(rng.normal(size=(CHUNK, 2)))
  return np.concatenate(ks), np.concatenate(ts), np.concatenate(vs)


def numpy_features(keys: np.ndarray, times: np.ndarray, values: np.ndarray) -> int:
  """All features per (key, window) with numpy; returns the number of windows."""
  window = np.floor(times / WINDOW).astype(np.int64)
  order = np.lexsort((times, window, keys))
  k, w, t, v = keys[order], window[order], times[order], values[order]
  starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (w[1:] != w[:-1])])
  count = np.diff(np.r_[starts, len(k)])
  total = np.add.reduceat(v, starts, axis=0)
  mean = total / count[:, None]
  sq = np.add.reduceat((v - np.repeat(mean, count, axis=0)) ** 2, starts, axis=0)
  std = np.sqrt(sq / count[:, None])
  lo, hi = np.minimum.reduceat(v, starts, axis=0), np.maximum.reduceat(v, starts, axis=0)
  ends = np.r_[starts[1:], len(k)] - 1
  last, first_t, last_t = v[ends], t[starts], t[ends]
  rate = count / WINDOW
  assert len({a.shape[0] for a in (total, mean, std, lo, hi, last, first_t, last_t, rate)}) == 1
  return len(starts)


IN_PROCESS = ['--runner=FnApiRunner', '--direct_num_workers=1']
# One SDK worker in a subprocess: its state cache is off by default
# (--max_cache_memory_usage_mb=0), so user state is not sized with objsize.
SUBPROCESS = IN_PROCESS + ['--direct_running_mode=multi_processing']


def run_beam(total: int, keys: int, build, flags=None) -> tuple[float, int]:
  options = PipelineOptions(flags or IN_PROCESS)
  start = time.perf_counter()
  with beam.Pipeline(options=options) as p:
    events = (p | beam.Create(range(total // CHUNK))
              | 'Generate' >> beam.FlatMap(make_events, CHUNK, keys)
              | EventTimestamps())
    build(events) | 'CountOutputs' >> beam.Map(lambda _: OUTPUTS.inc())
  seconds = time.perf_counter() - start
  counters = p.result.metrics().query(MetricsFilter().with_name('outputs'))['counters']
  return seconds, sum(c.committed for c in counters)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--events', type=int, default=200_000)
  parser.add_argument('--keys', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--gate_events', type=int, default=20_000,
                      help='events for the late-gate case (user state is slow on the local runner)')
  args = parser.parse_args(argv)
  total = args.events // CHUNK * CHUNK
  spec = WindowSpec('fixed', size=WINDOW)
  streaming_path = dict(batch_path=False)
  cases = {  # name: (build, runner flags)
      'generate + count only (Beam overhead)': (lambda e: e, None),
      'WindowedFeatures, batch path (default)': (lambda e: (e | WindowedFeatures(spec)).records, None),
      'WindowedFeatures, streaming path, no gate': (
          lambda e: (e | WindowedFeatures(spec, route_late=False, **streaming_path)).records, None),
      'WindowedFeatures, streaming path, late gate + state': (
          lambda e: (e | WindowedFeatures(spec, **streaming_path)).records, None),
      '  same, SDK worker in a subprocess': (
          lambda e: (e | WindowedFeatures(spec, **streaming_path)).records, SUBPROCESS),
      'WindowedSequences (last 16), no gate': (
          lambda e: (e | WindowedSequences(spec, 16, route_late=False)).records, None),
  }
  k, t, v = arrays(total, args.keys)
  best = min(_timed(numpy_features, k, t, v) for _ in range(args.repeats))
  n_windows = numpy_features(k, t, v)
  print(f'{total} events, {args.keys} keys, 2 features, {WINDOW:g} s fixed windows '
        f'({n_windows} key-windows); best of {args.repeats}')
  print(f'{"pipeline":42s} {"events":>8s} {"seconds":>8s} {"events/s/core":>14s} {"outputs":>8s}')
  print(f'{"numpy (lexsort + reduceat), same features":42s} {total:8d} {best:8.3f} {total / best:14,.0f} '
        f'{n_windows:8d}')
  for name, (build, flags) in cases.items():
    n = min(total, args.gate_events // CHUNK * CHUNK) if 'gate + state' in name or 'same,' in name else total
    runs = [run_beam(n, args.keys, build, flags) for _ in range(args.repeats)]
    seconds, outputs = min(runs)
    print(f'{name:42s} {n:8d} {seconds:8.3f} {n / seconds:14,.0f} {outputs:8d}', flush=True)


def _timed(fn, *args):
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


if __name__ == '__main__':
  main()
