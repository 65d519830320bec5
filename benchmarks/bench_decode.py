"""Decoding benchmarks, printed side by side in one run.

    .venv/bin/python -m benchmarks.bench_decode [--images 2000] [--repeats 5]

1. Decode + resize throughput on one core: `DecodeImages` inside a Beam
   pipeline (FnApiRunner, one worker) vs a plain Python loop calling the same
   `decode_image` on the same bytes. Target: Beam >= 90% of the loop's rate.
   Runs are interleaved and both wall and process CPU time are reported: on a
   shared machine CPU time is the steadier measure of per-core throughput.
2. Reduced-size JPEG decoding (Pillow `draft`, DCT-domain downscale) vs full
   decode then resize, on >= 1 megapixel photos (scikit-image sample photos
   upscaled in memory).
3. Sequence length bucketing: padding fraction of `BucketByLength` vs padding
   everything to one length, on a skewed (log-normal) length mix, read from the
   transforms' own 'real_steps' / 'padding_steps' counters.
4. SequenceExample parsing rate: `ParseSequenceExamples` in Beam vs the same
   batched parser in a loop vs one `tf.io.parse_single_sequence_example` a record.
"""

from __future__ import annotations

import argparse
import io
import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from beam_dl.decoding import padding
from beam_dl.decoding.images import ImageSpec, decode_image
from beam_dl.decoding.sequences import SequenceRecord
from transforms.images import DecodeImages
from transforms.sequences import BucketByLength, PadSequences

SPEC = ImageSpec(height=224, width=224, channels=3)


def photos(min_pixels: int = 1_000_000) -> dict[str, np.ndarray]:
  """scikit-image sample photos upscaled (Lanczos) to >= min_pixels each."""
  from skimage import data  # pylint: disable=g-import-not-at-top

  out = {}
  for name in ('astronaut', 'coffee', 'chelsea'):
    img = Image.fromarray(getattr(data, name)())
    scale = int(np.ceil(np.sqrt(min_pixels / (img.width * img.height))))
    out[name] = np.asarray(img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS))
  return out


def encode(array: np.ndarray, fmt: str = 'JPEG', **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt, **kwargs)
  return buf.getvalue()


def workload(n: int, side: int = 640) -> list[tuple[str, bytes]]:
  """n distinct JPEGs of about side x 3/4 side: random crops of the sample photos."""
  rng = np.random.default_rng(0)
  srcs = list(photos().values())
  out = []
  for i in range(n):
    src = srcs[i % len(srcs)]
    h, w = (side * 3) // 4, side
    y, x = rng.integers(0, src.shape[0] - h), rng.integers(0, src.shape[1] - w)
    out.append((f'img{i}', encode(np.ascontiguousarray(src[y : y + h, x : x + w]), quality=90)))
  return out


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process, all threads) for one call."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def _interleaved(fns: dict, repeats: int) -> dict:
  """Median (wall, cpu) per fn, runs interleaved so load from other jobs hits all alike."""
  runs = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      runs[name].append(_timed(fn))
  return {name: tuple(float(np.median([r[i] for r in rs])) for i in (0, 1)) for name, rs in runs.items()}


_BLOBS: list[tuple[str, bytes]] = []


def _blob(i: int) -> tuple[str, bytes]:
  """The i-th workload image: FnApiRunner runs in this process, so the pipeline
  reads the very bytes the loop decodes without pickling 20 MB into Create."""
  return _BLOBS[i]


def bench_beam_vs_loop(n: int, repeats: int) -> dict:
  _BLOBS[:] = workload(n)
  spec = SPEC

  def loop():
    for _, data in _BLOBS:
      decode_image(data, spec)

  def pipeline(decode: bool):
    opts = PipelineOptions(['--runner=FnApiRunner', '--direct_num_workers=1'])
    with beam.Pipeline(options=opts) as p:
      keyed = (
        p | beam.Create(range(n), reshuffle=False) | 'Bytes' >> beam.Map(_blob).with_output_types(tuple[str, bytes])
      )
      out = (keyed | DecodeImages(spec)).decoded if decode else keyed
      _ = out | beam.combiners.Count.Globally()

  pipeline(True)  # warm up: imports, first-use costs
  got = _interleaved({'loop': loop, 'beam': lambda: pipeline(True), 'empty': lambda: pipeline(False)}, repeats)
  return {'n': n, **{f'{k}_{m}': got[k][i] for k in got for i, m in enumerate(('s', 'cpu'))}}


def bench_draft(repeats: int) -> list[dict]:
  rows = []
  full_spec = (
    ImageSpec(height=224, width=224, channels=3, reduced_decode=False)
    if 'reduced_decode' in ImageSpec.__dataclass_fields__
    else None
  )
  for name, array in photos().items():
    data = encode(array, quality=90)
    reps = 10

    def with_draft():
      for _ in range(reps):
        decode_image(data, SPEC)

    def full():
      for _ in range(reps):
        if full_spec is not None:
          decode_image(data, full_spec)
        else:
          with Image.open(io.BytesIO(data)) as img:
            np.asarray(img.convert('RGB').resize((224, 224), Image.Resampling.BILINEAR))

    d, f = _best(with_draft, repeats) / reps, _best(full, repeats) / reps
    rows.append(
      {
        'photo': name,
        'size': f'{array.shape[1]}x{array.shape[0]}',
        'mpix': array.shape[0] * array.shape[1] / 1e6,
        'draft_ms': d * 1e3,
        'full_ms': f * 1e3,
      }
    )
  return rows


def skewed_sequences(n: int, max_length: int, seed: int = 0) -> list[SequenceRecord]:
  """Log-normal lengths (median ~20, long tail to max_length), in random order."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(mean=3.0, sigma=1.0, size=n).astype(int), 1, max_length)
  return [SequenceRecord(f's{i}', np.zeros((int(t), 1), np.float32)) for i, t in enumerate(lengths)]


def _padding_counters(records, transform) -> tuple[int, int]:
  opts = PipelineOptions(['--runner=FnApiRunner'])
  p = beam.Pipeline(options=opts)
  _ = p | beam.Create(records) | transform
  result = p.run()
  result.wait_until_finish()
  got = {}
  for name in ('real_steps', 'padding_steps'):
    res = result.metrics().query(MetricsFilter().with_name(name))['counters']
    got[name] = sum(r.committed for r in res)
  return got['real_steps'], got['padding_steps']


def bench_bucketing(n: int = 5000, max_length: int = 512, batch_size: int = 32) -> dict:
  records = skewed_sequences(n, max_length)
  boundaries = padding.default_boundaries(max_length, 8)
  fixed = _padding_counters(records, PadSequences(max_length, batch_size))
  bucketed = _padding_counters(records, BucketByLength(boundaries, batch_size))
  # Without bucketing but padding each batch only to its own longest sequence.
  lengths = [r.length for r in records]
  per_batch = [max(lengths[i : i + batch_size]) for i in range(0, n, batch_size) for _ in lengths[i : i + batch_size]]
  return {
    'n': n,
    'batch_size': batch_size,
    'boundaries': boundaries,
    'median_len': float(np.median(lengths)),
    'max_len': max(lengths),
    'fixed': fixed[1] / sum(fixed),
    'batch_max': padding.padding_fraction(lengths, per_batch),
    'bucketed': bucketed[1] / sum(bucketed),
  }


def bench_sequence_parsing(n: int = 20000, repeats: int = 3) -> dict:
  """records/s: batched TF parser in Beam vs the same in a loop vs one-at-a-time TF parsing."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from beam_dl.formats import sequence_example  # pylint: disable=g-import-not-at-top
  from transforms.sequences import ParseSequenceExamples  # pylint: disable=g-import-not-at-top

  spec = sequence_example.SequenceSpec(num_features=4)
  records = [
    sequence_example.encode_sequence_example(r.replace(values=np.ones((r.length, 4), np.float32)), spec)
    for r in skewed_sequences(n, 256)
  ]
  _BLOBS[:] = [(str(i), r) for i, r in enumerate(records)]

  def batched_loop():
    for i in range(0, n, 512):
      sequence_example.parse_sequence_examples(records[i : i + 512], spec)

  def pipeline():
    opts = PipelineOptions(['--runner=FnApiRunner', '--direct_num_workers=1'])
    with beam.Pipeline(options=opts) as p:
      _ = (
        p
        | beam.Create(range(n), reshuffle=False)
        | 'Bytes' >> beam.Map(lambda i: _blob(i)[1]).with_output_types(bytes)
        | ParseSequenceExamples(spec)
      ).parsed | beam.combiners.Count.Globally()

  m = 500
  ctx = {'key': tf.io.FixedLenFeature([], tf.string)}
  seq = {'values': tf.io.FixedLenSequenceFeature([4], tf.float32)}

  def single():
    for r in records[:m]:
      tf.io.parse_single_sequence_example(r, ctx, seq)

  return {
    'n': n,
    'loop_rate': n / _best(batched_loop, repeats),
    'beam_rate': n / _best(pipeline, repeats),
    'single_rate': m / _best(single, repeats),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  logging.getLogger().setLevel(logging.WARNING)

  r = bench_beam_vs_loop(args.images, args.repeats)
  n = r['n']
  print(f'\n1. decode+resize to 224x224, {n} JPEGs 640x480, one worker (median of {args.repeats} interleaved runs)')
  print(f'   {"":<34}{"img/s wall":>11}{"img/CPU-s":>11}')
  print(f'   {"plain Python loop":<34}{n / r["loop_s"]:11.1f}{n / r["loop_cpu"]:11.1f}')
  print(
    f'   {"Beam DecodeImages (FnApiRunner)":<34}{n / r["beam_s"]:11.1f}{n / r["beam_cpu"]:11.1f}'
    f'   = {r["loop_s"] / r["beam_s"]:.0%} wall, {r["loop_cpu"] / r["beam_cpu"]:.0%} CPU of the loop'
  )
  print(f'   {"empty pipeline (same Create/Count)":<34}{r["empty_s"]:10.2f}s{r["empty_cpu"]:10.2f}s')
  sw, sc = r['beam_s'] - r['empty_s'], r['beam_cpu'] - r['empty_cpu']
  print(
    f'   {"Beam minus the empty pipeline":<34}{n / sw:11.1f}{n / sc:11.1f}'
    f'   = {r["loop_s"] / sw:.0%} wall, {r["loop_cpu"] / sc:.0%} CPU of the loop'
  )

  print('\n2. JPEG reduced-size decoding (draft) vs full decode + resize, to 224x224 RGB')
  print(f'   {"photo":<11}{"size":>11}{"Mpix":>6}{"draft ms":>10}{"full ms":>9}{"speed-up":>10}')
  for row in bench_draft(args.repeats):
    print(
      f'   {row["photo"]:<11}{row["size"]:>11}{row["mpix"]:6.1f}{row["draft_ms"]:10.1f}'
      f'{row["full_ms"]:9.1f}{row["full_ms"] / row["draft_ms"]:9.1f}x'
    )

  b = bench_bucketing()
  print(
    f'\n3. padding fraction, {b["n"]} sequences, log-normal lengths (median {b["median_len"]:.0f}, '
    f'max {b["max_len"]}), batch {b["batch_size"]}'
  )
  print(f'   {"PadSequences(length=512)":<44}{b["fixed"]:7.1%}')
  print(f'   {"pad each batch to its longest (no buckets)":<44}{b["batch_max"]:7.1%}')
  print(f'   {"BucketByLength" + str(b["boundaries"]):<44}{b["bucketed"]:7.1%}')

  s = bench_sequence_parsing(repeats=args.repeats)
  print(f'\n4. SequenceExample parsing, {s["n"]} records (median 19 steps x 4 floats), one core')
  print(f'   {"tf.io.parse_single_sequence_example loop":<44}{s["single_rate"]:9.0f} rec/s')
  print(f'   {"parse_sequence_examples, batches of 512":<44}{s["loop_rate"]:9.0f} rec/s')
  print(
    f'   {"Beam ParseSequenceExamples (FnApiRunner)":<44}{s["beam_rate"]:9.0f} rec/s'
    f'  = {s["beam_rate"] / s["loop_rate"]:.0%} of the batched loop'
  )


if __name__ == '__main__':
  # Run from the importable module, not __main__: cloudpickle pickles __main__
  # functions by value, which would ship the whole _BLOBS list with every fn.
  from benchmarks import bench_decode  # pylint: disable=g-import-not-at-top

  bench_decode.main()
