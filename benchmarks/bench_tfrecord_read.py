"""TFRecord reading: beam_dl's damage-tolerant `ReadTFRecords` vs Beam's `ReadFromTFRecord`.

    python -m benchmarks.bench_tfrecord_read [--files 4] [--records 50000] [--size 200] [--repeats 3]

Both read the same intact files (written by tf.io.TFRecordWriter) in a
FnApiRunner pipeline that counts records; runs are interleaved and each
prints records/s, then the medians and the ratio ReadTFRecords / Beam. A
third line times the framing loop alone (`beam_dl.io.tfrecord.read_records`
over one file, no Beam) against Beam's own `_TFRecordUtil.read_record` loop.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import apache_beam as beam
from apache_beam.io import tfrecordio
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_dl.io import tfrecord
from transforms.tfrecords import ReadTFRecords


def write_files(directory: str, files: int, records: int, size: int) -> str:
  import tensorflow as tf

  payload = os.urandom(size)
  for f in range(files):
    with tf.io.TFRecordWriter(os.path.join(directory, f'part-{f}.tfrecord')) as writer:
      for _ in range(records):
        writer.write(payload)
  return os.path.join(directory, '*.tfrecord')


def _count(_):
  Metrics.counter('bench', 'records').inc()


def count_with(read, pattern: str) -> tuple[int, float]:
  start = time.perf_counter()
  p = beam.Pipeline(options=PipelineOptions(['--runner=FnApiRunner']))
  read(p, pattern) | beam.Map(_count)
  result = p.run()
  result.wait_until_finish()
  seconds = time.perf_counter() - start
  counters = result.metrics().query(MetricsFilter().with_name('records'))['counters']
  return sum(c.committed for c in counters), seconds


def beam_dl_read(p, pattern):
  return (p | ReadTFRecords(pattern)).records


def beam_read(p, pattern):
  return p | beam.io.ReadFromTFRecord(pattern)


def framing_loops(path: str) -> tuple[float, float]:
  with open(path, 'rb') as f:
    blob = f.read()
  start = time.perf_counter()
  n = sum(1 for _ in tfrecord.read_records(io.BytesIO(blob)))
  ours = time.perf_counter() - start
  stream, m = io.BytesIO(blob), 0
  start = time.perf_counter()
  while tfrecordio._TFRecordUtil.read_record(stream) is not None:  # pylint: disable=protected-access
    m += 1
  theirs = time.perf_counter() - start
  assert n == m
  return n / ours, m / theirs


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--files', type=int, default=4)
  parser.add_argument('--records', type=int, default=50_000)
  parser.add_argument('--size', type=int, default=200)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as directory:
    pattern = write_files(directory, args.files, args.records, args.size)
    total = args.files * args.records
    rates = {'ReadTFRecords': [], 'ReadFromTFRecord': []}
    for i in range(args.repeats):
      for name, read in (('ReadTFRecords', beam_dl_read), ('ReadFromTFRecord', beam_read)):
        n, seconds = count_with(read, pattern)
        assert n == total, (name, n, total)
        rates[name].append(n / seconds)
        print(f'run {i} {name:17s} {n} records in {seconds:.2f} s: {n / seconds:,.0f} records/s')
    ours, theirs = (statistics.median(rates[k]) for k in ('ReadTFRecords', 'ReadFromTFRecord'))
    print(
      f'median ReadTFRecords {ours:,.0f} records/s | ReadFromTFRecord {theirs:,.0f} records/s '
      f'| ratio {ours / theirs:.2f}'
    )
    loop_ours, loop_theirs = framing_loops(pattern.replace('*', 'part-0'))
    print(
      f'framing loop alone: read_records {loop_ours:,.0f} records/s | Beam read_record '
      f'{loop_theirs:,.0f} records/s | ratio {loop_ours / loop_theirs:.2f}'
    )


if __name__ == '__main__':
  main()
