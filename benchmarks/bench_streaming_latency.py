"""Streaming scoring latency on the local runner: p50/p99 at a measured input rate.

    .venv/bin/python -m benchmarks.bench_streaming_latency [--ticks 40] [--per_tick 10 100]

The scoring path of `pipelines.score_sequences` (WindowedSequences with an
EARLY pane per event -> RunInference with a small Flax LSTM -> score records)
runs in streaming mode on the DirectRunner, fed by a TestStream: each tick
adds `per_tick` events over 10 keys, advances the watermark and the
processing time. Latency is the wall-clock time from an event entering the
windowing step (its arrival stamp) to its score record being formatted: the
same `latency_s` the pipeline writes.

TestStream releases events as fast as the runner takes them, so the input
rate is what the runner sustained (events / wall seconds), stated beside the
latency. The model is trained for a few steps on the CO2 series
(statsmodels); its accuracy is irrelevant here.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream

from beam_dl.features import WindowSpec
from beam_dl.handler import JaxModelHandler
from beam_dl.io.events import Event
from pipelines import score_sequences, score_sequences_demo as demo
from transforms.inference import RunInferenceWithDeadLetters
from transforms.windowing import WindowedSequences

LATENCIES: list[float] = []  # the DirectRunner runs in this process


def _collect(record):
  # Imported by name: under `python -m` this file is also `__main__`, whose
  # globals cloudpickle would copy rather than share.
  from benchmarks import bench_streaming_latency as shared  # pylint: disable=g-import-not-at-top
  shared.LATENCIES.append(record['latency_s'])


def stream(ticks: int, per_tick: int, keys: int = 10) -> TestStream:
  rng = np.random.default_rng(0)
  ts = TestStream()
  for tick in range(ticks):
    base = 1000.0 + tick
    events = [Event(f'k{i % keys}', base + i / per_tick, (float(330 + rng.normal()),)) for i in range(per_tick)]
    ts = (ts.add_elements([beam.window.TimestampedValue(e, e.time) for e in events])
          .advance_watermark_to(base + 1).advance_processing_time(1))
  return ts.advance_watermark_to_infinity()


def run(model_dir: str, ticks: int, per_tick: int) -> dict:
  from benchmarks import bench_streaming_latency as shared  # pylint: disable=g-import-not-at-top
  shared.LATENCIES.clear()
  spec = WindowSpec('fixed', size=60, early_after_count=1, accumulation='accumulating')
  start = time.perf_counter()
  with beam.Pipeline(runner='DirectRunner', options=PipelineOptions([], streaming=True)) as p:
    seqs = p | stream(ticks, per_tick) | WindowedSequences(spec, 16, num_features=1)
    examples = seqs.records | beam.ParDo(score_sequences._ToExampleFn(False)).with_outputs('failed', main='ok')
    scored = examples.ok | RunInferenceWithDeadLetters(JaxModelHandler(model_dir, max_batch_size=64))
    scored.predictions | beam.ParDo(score_sequences.FormatScoreFn()) | beam.Map(_collect)
  seconds = time.perf_counter() - start
  lat = np.array(shared.LATENCIES) * 1000
  warm = lat[len(lat) // 10:]  # the first outputs include JIT compiles of the model
  events = ticks * per_tick
  return {'events': events, 'seconds': seconds, 'rate': events / seconds, 'outputs': len(lat),
          'p50': np.percentile(lat, 50), 'p99': np.percentile(lat, 99), 'max': lat.max(),
          'warm_p50': np.percentile(warm, 50), 'warm_p99': np.percentile(warm, 99)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--ticks', type=int, default=40)
  parser.add_argument('--per_tick', type=int, nargs='+', default=[10, 100])
  args = parser.parse_args(argv)
  model_dir = tempfile.mkdtemp(prefix='latency_model_')
  _, values = demo.load_series()
  demo.train_model(model_dir, values[:400], steps=20)
  print('latency ms: all outputs | after the first 10% (JIT warm-up); one output per key per tick '
        '(an EARLY pane fires per bundle)')
  print(f'{"events/tick":>11s} {"events":>7s} {"seconds":>8s} {"input ev/s":>10s} {"outputs":>8s} '
        f'{"p50":>7s} {"p99":>7s} {"max":>7s} | {"p50":>6s} {"p99":>6s}')
  for per_tick in args.per_tick:
    r = run(model_dir, args.ticks, per_tick)
    print(f'{per_tick:11d} {r["events"]:7d} {r["seconds"]:8.2f} {r["rate"]:10.1f} {r["outputs"]:8d} '
          f'{r["p50"]:7.1f} {r["p99"]:7.1f} {r["max"]:7.1f} | {r["warm_p50"]:6.1f} {r["warm_p99"]:6.1f}',
          flush=True)


if __name__ == '__main__':
  main()
