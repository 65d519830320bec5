"""Windowed feature extraction throughput: Beam vs plain numpy, side by side.

    .venv/bin/python -m benchmarks.bench_windowing [--events 200000] [--keys 100] [--repeats 2]

Synthetic events (keys x 2 features, event times uniform over one hour) go
through `WindowedFeatures` (60 s fixed windows: count, sum, mean, std, min,
max, last, rate) on the FnApiRunner with one worker (one core): the batch
path (numpy per key block, what batch pipelines get) with one Beam element
per event and with the events entering as `EventBlock`s (a columnar source,
`event_blocks=True`), the streaming path with and without the late-data gate (the
gate with beam_dl's state-cache sizing fix, with Beam's own sizing, and with
the SDK worker in a subprocess, where Beam's state cache is off), and
through `WindowedSequences` (last 16 events). The same events in every case
(one seeded draw per chunk of 10,000). With `--files`, the same events also
come from JSON-lines files (one per chunk): `ReadEvents` + `EventTimestamps`
into the batch and streaming paths, and `ReadEventBlocks` into the batch path
with `event_blocks=True` (parsing included).
Beside it: the same features computed with numpy over sorted arrays
(`np.lexsort` + `ufunc.reduceat`), the floor any Python-element pipeline pays
for. A generate-and-count pipeline shows Beam's own per-element cost.
Events/s are per core: every Beam figure is one SDK worker on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from typing import Callable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.worker import statecache

from beam_dl.beam_fixes import state_cache_sizing
from beam_dl.features import WindowSpec
from beam_dl.features.batch_windows import EventBlock, event_block
from beam_dl.formats.events import Event, EventSpec
from transforms.sequences import ReadEventBlocks, ReadEvents
from transforms.windowing import EventTimestamps, WindowedFeatures, WindowedSequences

WINDOW = 60.0
OUTPUTS = Metrics.counter('bench_windowing', 'outputs')
CHUNK = 10_000


def draws(chunk: int, n: int, keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Chunk `chunk`'s events as arrays: key numbers [n], times [n] (s), values [n, 2]."""
  rng = np.random.default_rng(chunk)
  return rng.integers(0, keys, n), rng.uniform(0, 3600, n), rng.normal(size=(n, 2))


def make_events(chunk: int, n: int, keys: int) -> list[Event]:
  k, t, v = draws(chunk, n, keys)
  return [Event(f'k{a}', float(b), (float(c), float(d))) for a, b, (c, d) in zip(k, t, v)]


def make_event_block(chunk: int, n: int, keys: int) -> list[EventBlock]:
  """The same events as `make_events`, as one columnar block."""
  k, t, v = draws(chunk, n, keys)
  names = np.array([f'k{a}' for a in range(keys)], dtype=object)
  return [event_block(names[k], t, v)]


def arrays(total: int, keys: int):
  ks, ts, vs = zip(*(draws(chunk, CHUNK, keys) for chunk in range(total // CHUNK)))
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


class Case(NamedTuple):
  build: Callable
  flags: list | None = None
  source: str = 'events'  # 'events', 'blocks' (EventBlocks), 'jsonl' / 'jsonl-blocks' (files)
  gate: bool = False  # user state: run on --gate_events only
  beam_sizing: bool = False  # Beam's own state-cache sizing (the beam_fixes one undone)


@contextlib.contextmanager
def beams_own_state_cache_sizing():
  statecache.get_deep_size = state_cache_sizing.BEAM_DEEP_SIZE
  try:
    yield
  finally:
    state_cache_sizing.apply()


JSONL_SPEC = EventSpec(value_fields=('a', 'b'))


def write_jsonl(directory: str, total: int, keys: int) -> str:
  """The events as JSON lines, one file per chunk; returns the file pattern."""
  for chunk in range(total // CHUNK):
    with open(os.path.join(directory, f'events-{chunk:05d}.jsonl'), 'w', encoding='utf-8') as f:
      for e in make_events(chunk, CHUNK, keys):
        f.write(json.dumps({'key': e.key, 'time': e.time, 'a': e.values[0], 'b': e.values[1]}) + '\n')
  return os.path.join(directory, 'events-*.jsonl')


def run_beam(total: int, keys: int, case: Case, pattern: str | None = None) -> tuple[float, int]:
  options = PipelineOptions(case.flags or IN_PROCESS)
  sizing = beams_own_state_cache_sizing() if case.beam_sizing else contextlib.nullcontext()
  start = time.perf_counter()
  with sizing, beam.Pipeline(options=options) as p:
    if case.source == 'jsonl':
      events = (p | ReadEvents(pattern, JSONL_SPEC)).events | EventTimestamps()
    elif case.source == 'jsonl-blocks':
      events = (p | ReadEventBlocks(pattern, JSONL_SPEC)).events
    elif case.source == 'blocks':
      events = p | beam.Create(range(total // CHUNK)) | 'GenerateBlocks' >> beam.FlatMap(make_event_block, CHUNK, keys)
    else:
      events = (
        p
        | beam.Create(range(total // CHUNK))
        | 'Generate' >> beam.FlatMap(make_events, CHUNK, keys)
        | EventTimestamps()
      )
    case.build(events) | 'CountOutputs' >> beam.Map(lambda _: OUTPUTS.inc())
  seconds = time.perf_counter() - start
  counters = p.result.metrics().query(MetricsFilter().with_name('outputs'))['counters']
  return seconds, sum(c.committed for c in counters)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--events', type=int, default=200_000)
  parser.add_argument('--keys', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument(
    '--gate_events',
    type=int,
    default=20_000,
    help='events for the late-gate cases (user state is slow on the local runner)',
  )
  parser.add_argument('--files', action='store_true', help='also read the events from JSON-lines files')
  args = parser.parse_args(argv)
  total = args.events // CHUNK * CHUNK
  spec = WindowSpec('fixed', size=WINDOW)

  def streaming_path(**kwargs):
    return lambda e: (e | WindowedFeatures(spec, batch_path=False, **kwargs)).records

  cases = {
    'generate + count only (Beam overhead)': Case(lambda e: e),
    'WindowedFeatures, batch path (default)': Case(lambda e: (e | WindowedFeatures(spec)).records),
    '  same, EventBlock input (event_blocks=True)': Case(
      lambda e: (e | WindowedFeatures(spec, event_blocks=True)).records, source='blocks'
    ),
    'WindowedFeatures, streaming path, no gate': Case(streaming_path(route_late=False)),
    'WindowedFeatures, streaming path, late gate + state': Case(streaming_path(), gate=True),
    "  same, Beam's own state-cache sizing": Case(streaming_path(), gate=True, beam_sizing=True),
    '  same, SDK worker in a subprocess': Case(streaming_path(), SUBPROCESS, gate=True),
    'WindowedSequences (last 16), no gate': Case(lambda e: (e | WindowedSequences(spec, 16, route_late=False)).records),
  }
  if args.files:
    cases.update(
      {
        'files: ReadEvents, batch path': Case(lambda e: (e | WindowedFeatures(spec)).records, source='jsonl'),
        'files: ReadEventBlocks, batch path (event_blocks)': Case(
          lambda e: (e | WindowedFeatures(spec, event_blocks=True)).records, source='jsonl-blocks'
        ),
        'files: ReadEvents, streaming path, no gate': Case(streaming_path(route_late=False), source='jsonl'),
      }
    )
  k, t, v = arrays(total, args.keys)
  best = min(_timed(numpy_features, k, t, v) for _ in range(args.repeats))
  n_windows = numpy_features(k, t, v)
  print(
    f'{total} events, {args.keys} keys, 2 features, {WINDOW:g} s fixed windows '
    f'({n_windows} key-windows); best of {args.repeats}'
  )
  print(f'{"pipeline":52s} {"events":>8s} {"seconds":>8s} {"events/s/core":>14s} {"outputs":>8s}')
  print(
    f'{"numpy (lexsort + reduceat), same features":52s} {total:8d} {best:8.3f} {total / best:14,.0f} {n_windows:8d}'
  )
  rates = {}
  files = tempfile.TemporaryDirectory(prefix='bench_windowing_')
  pattern = write_jsonl(files.name, total, args.keys) if args.files else None
  for name, case in cases.items():
    n = min(total, args.gate_events // CHUNK * CHUNK) if case.gate else total
    if not n:
      continue
    seconds, outputs = min(run_beam(n, args.keys, case, pattern) for _ in range(args.repeats))
    rates[name] = n / seconds
    print(f'{name:52s} {n:8d} {seconds:8.3f} {n / seconds:14,.0f} {outputs:8d}', flush=True)
  streaming = 'WindowedFeatures, streaming path, no gate'
  gate = 'WindowedFeatures, streaming path, late gate + state'
  for label, top, bottom in [
    ('batch path / streaming path (Event input)', 'WindowedFeatures, batch path (default)', streaming),
    ('batch path, EventBlock input / streaming path', '  same, EventBlock input (event_blocks=True)', streaming),
    ("late gate: beam_dl's sizing / Beam's own", gate, "  same, Beam's own state-cache sizing"),
    ('late gate: beam_dl sizing / subprocess worker', gate, '  same, SDK worker in a subprocess'),
    (
      'files: ReadEvents batch / ReadEvents streaming',
      'files: ReadEvents, batch path',
      'files: ReadEvents, streaming path, no gate',
    ),
    (
      'files: ReadEventBlocks batch / ReadEvents streaming',
      'files: ReadEventBlocks, batch path (event_blocks)',
      'files: ReadEvents, streaming path, no gate',
    ),
  ]:
    if top in rates and bottom in rates:
      print(f'{label:52s} {rates[top] / rates[bottom]:8.2f}x')
  files.cleanup()


def _timed(fn, *args):
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


if __name__ == '__main__':
  main()
