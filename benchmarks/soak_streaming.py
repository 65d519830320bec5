"""Soak: Kafka -> score_sequences on the FlinkRunner -> Kafka at a steady rate for many minutes.

    make kafka-jars runners kafka-io
    .venv/bin/python -m benchmarks.soak_streaming [--rate 500] [--minutes 20] \
        [-- --max_bundle_time_mills 10 --max_bundle_size 100 ...]

The set-up of `benchmarks/bench_streaming_latency.py --kafka --flink_kafka_io`
(a broker from `beam_dl.services.kafka`; a Flink job server and Beam's Java
KafkaIO from `beam_dl.services.kafka_io`; the Python steps LOOPBACK in the
pipeline's process), held for `--minutes`. Every `--report_every_s` it prints
the events sent, the scores received, that period's latency p50/p99 (consumer
receipt minus the produce time of the newest event of the pane, end to end),
the p99 over EARLY panes only (`ev p99`: event -> its score; ON_TIME panes
wait for the watermark, see bench_streaming_latency)
and the resident memory of each process: the broker's JVM, the Flink job
server's JVM, the expansion service's JVM and the pipeline's Python process
(its SDK worker threads run there).

At the end, after events of a `_flush` key have moved the watermark past
every window, it checks each event: it is in its window's final pane (ON_TIME,
or its last LATE pane), or it is a dead letter; a pane seen twice is a duplicate. It
prints the events accounted for, missing and duplicated, each process's
memory growth after the first `--settle_minutes` (the largest sample over
the one at that time), and the spread of the per-period p99s. CI does not
run it (minutes by design); its figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import signal
import tempfile
import threading
import time

import numpy as np

from benchmarks.bench_streaming_latency import (
  _consume_scores,
  _produce_steady,
  pipeline_command,
  start_pipeline,
  wait_until_scoring,
)
from pipelines import score_sequences_demo as demo

FLUSH_KEY = '_flush0'  # the one key of the events that move the watermark at the end


def _rss_mb(pid: int) -> float:
  """Resident memory of one process (MB), 0 once it is gone."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def _find_pid(*needles: str) -> int | None:
  """The first process whose command line holds every one of `needles`."""
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/cmdline', 'rb') as f:
        cmdline = f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
    except OSError:
      continue
    if all(n in cmdline for n in needles):
      return int(entry)
  return None


def _window_start(t: float, size: float) -> float:
  return size * math.floor(t / size)


def final_panes(scores: list) -> dict:
  """{(key, window_start): the window's last pane that is not EARLY} (ON_TIME, or the LATE pane
  of its latest late event: panes accumulate, so that pane holds every event the window took)."""
  finals = {}
  for s in scores:
    if s.get('pane') in ('ON_TIME', 'LATE') and s['key'] != FLUSH_KEY:
      where = (s['key'], s['window_start'])
      if where not in finals or s['pane_index'] > finals[where]['pane_index']:
        finals[where] = s
  return finals


def account(sent: list, scores: list, failed: list, window_size: float) -> dict:
  """Each sent (key, time): in its window's final pane (`final_panes`), or a dead letter; a
  final or late pane seen twice (the same window and pane index) is a duplicate."""
  per_window = collections.Counter((key, _window_start(t, window_size)) for key, t in sent)
  seen = collections.Counter(
    (s['key'], s['window_start'], s.get('pane_index'))
    for s in scores
    if s.get('pane') in ('ON_TIME', 'LATE') and s['key'] != FLUSH_KEY
  )
  final_length = {where: s['length'] for where, s in final_panes(scores).items()}
  dead = collections.Counter()
  for f in failed:
    if f.get('key') == FLUSH_KEY:
      continue
    if f.get('stage') == 'late':  # one event
      dead[(f['key'], f['window_start'])] += 1
    elif f.get('stage') == 'sequence':  # a window with too few events: all of them
      where = (f['key'], f['window_start'])
      dead[where] += per_window.get(where, 0)
  missing = 0
  for where, count in per_window.items():
    missing += max(0, count - final_length.get(where, 0) - dead.get(where, 0))
  return {
    'events': len(sent),
    'windows': len(per_window),
    'missing': missing,
    'duplicate_panes': sum(n - 1 for n in seen.values() if n > 1),
    'dead_letters': sum(dead.values()),
  }


def main(argv=None):
  import sys

  from confluent_kafka import Producer  # pylint: disable=g-import-not-at-top

  from beam_dl.services import kafka_io  # pylint: disable=g-import-not-at-top
  from beam_dl.services.kafka import KafkaBroker  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index('--') + 1 :] if '--' in argv else []
  argv = argv[: argv.index('--')] if '--' in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rate', type=float, default=500.0, help='events per second')
  parser.add_argument('--minutes', type=float, default=20.0)
  parser.add_argument('--keys', type=int, default=100)
  parser.add_argument('--window_size', type=float, default=2.0, help='seconds per fixed window')
  parser.add_argument('--report_every_s', type=float, default=60.0)
  parser.add_argument('--settle_minutes', type=float, default=2.0, help='memory growth is measured after this')
  args = parser.parse_args(argv)
  reason = kafka_io.unavailable()
  if reason:
    parser.error(reason)
  # The whole window must fit the sequence, so a final pane's length counts its events.
  seq_len = max(16, int(math.ceil(args.rate / args.keys * args.window_size * 1.5)))

  model_dir = tempfile.mkdtemp(prefix='soak_model_')
  _, values = demo.load_series()
  demo.train_model(model_dir, values[:400], steps=20)
  with contextlib.ExitStack() as stack:
    broker = stack.enter_context(KafkaBroker(heap_mb=1024))
    job_endpoint, expansion = stack.enter_context(kafka_io.flink_with_kafka_io())
    topic, out = 'soak-events', 'soak-scores'
    for name in (topic, out, f'{out}-failed'):
      broker.create_topic(name)
    scores, failed, stop = [], [], threading.Event()
    for name, into in ((out, scores), (f'{out}-failed', failed)):
      threading.Thread(target=_consume_scores, args=(broker.bootstrap, name, stop, into), daemon=True).start()
    flags = [*kafka_io.runner_flags(job_endpoint, expansion), *extra]
    command = pipeline_command(broker.bootstrap, topic, out, model_dir, flags, args.window_size, seq_len)
    pipeline, log = start_pipeline(command, 'soak_pipeline_')
    stack.callback(lambda: kafka_io.cancel_running_jobs(job_endpoint))
    stack.callback(lambda: pipeline.poll() is None and os.killpg(pipeline.pid, signal.SIGKILL))
    stack.callback(stop.set)
    producer = Producer({'bootstrap.servers': broker.bootstrap, 'linger.ms': 1, 'log_level': 0})
    print(f'soak: {args.rate:g} events/s over {args.keys} keys for {args.minutes:g} min; flags: {" ".join(flags)}')
    print(f'pipeline log: {log.name}', flush=True)
    probe = wait_until_scoring(producer, topic, scores, pipeline, 400)
    if probe is None:
      raise SystemExit(f'the pipeline never scored the probe event; see {log.name}')
    processes = {
      'broker': _find_pid('kafka.Kafka', broker.workdir),
      'flink': _find_pid('FlinkJobServerDriver', job_endpoint.rsplit(':', 1)[1]),
      'expansion': _find_pid('ExpansionService', expansion.rsplit(':', 1)[1]),
      'python': pipeline.pid,
    }
    print(f'up after {probe:.1f} s; processes {processes}')
    print(
      f'{"min":>5s} {"sent":>8s} {"scores":>8s} {"p50 ms":>8s} {"p99 ms":>8s} {"ev p99":>8s} '
      + ' '.join(f'{n + " MB":>12s}' for n in processes)
    )
    sent: list = []
    memory: list[dict] = []
    p99s: list[float] = []
    event_p99s: list[float] = []
    start = time.time()
    while time.time() - start < args.minutes * 60 and pipeline.poll() is None:
      period_start = time.time()
      _produce_steady(producer, topic, args.rate, args.report_every_s, args.keys, record=sent)
      timed = [(t, r) for t, r in list(scores) if r.get('last_time', 0) >= period_start and r['key'] != 'probe']
      latencies = [(t - r['last_time']) * 1000 for t, r in timed]
      p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float('nan'), float('nan'))
      early = [(t - r['last_time']) * 1000 for t, r in timed if r.get('pane') == 'EARLY']
      event_p99s.append(np.percentile(early, 99) if early else float('nan'))
      memory.append({name: _rss_mb(pid) if pid else 0.0 for name, pid in processes.items()})
      p99s.append(p99)
      minute = (time.time() - start) / 60
      print(
        f'{minute:5.1f} {len(sent):8d} {len(scores):8d} {p50:8.1f} {p99:8.1f} {event_p99s[-1]:8.1f} '
        + ' '.join(f'{memory[-1][n]:12.0f}' for n in processes),
        flush=True,
      )
    # Move the watermark past every window: events of a key of their own, for 3 windows.
    _produce_steady(producer, topic, 10, 3 * args.window_size + 2, keys=1, key_prefix=FLUSH_KEY[:-1])
    flush_until = time.time() + 120
    last_window = _window_start(max(t for _, t in sent), args.window_size) if sent else 0
    while time.time() < flush_until and not any(
      r.get('pane') == 'ON_TIME' and r['window_start'] >= last_window for _, r in list(scores)
    ):
      time.sleep(1)
    time.sleep(3)  # the last panes' stragglers
  records = [r for _, r in scores if r.get('key') != 'probe']
  result = account(sent, records, [r for _, r in failed], args.window_size)
  settle = int(args.settle_minutes * 60 / args.report_every_s)
  print(
    f'accounted: {result["events"] - result["missing"]}/{result["events"]} events in {result["windows"]} windows '
    f'({result["dead_letters"]} as dead letters); missing {result["missing"]}; duplicate final panes '
    f'{result["duplicate_panes"]}'
  )
  if len(memory) > settle:
    base = memory[settle - 1] if settle else memory[0]
    growth = {n: max(m[n] for m in memory[settle:]) / base[n] - 1 for n in processes if base[n]}
    print('memory growth after settling: ' + ', '.join(f'{n} {g * 100:+.1f}%' for n, g in growth.items()))
  if len(p99s) > settle:
    print(f'p99 per period after settling: min {min(p99s[settle:]):.1f} ms, max {max(p99s[settle:]):.1f} ms')
    ev = event_p99s[settle:]
    print(f'event p99 (EARLY panes) per period after settling: min {min(ev):.1f} ms, max {max(ev):.1f} ms')


if __name__ == '__main__':
  main()
