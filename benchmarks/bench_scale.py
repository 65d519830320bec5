"""Wall time and peak memory of classify_images as the input grows.

Each size runs `python -m pipelines.classify_images` in a fresh subprocess on
the DirectRunner over generated 64x64 PNG/JPEG images (2,000 distinct files,
hard-linked into as many folders as the size needs; see bench_flagship) with
the SmallCNN model dir, batch 128. Peak RSS is the pipeline process's own,
from GNU time (`/usr/bin/time -f %M`): the largest of the process and the
children it reaped, so with --mode mp2 the larger of the main process and
one SDK worker. Not this script's `os.wait4` rusage: a child's ru_maxrss
starts at the RSS its parent had when it forked (Linux keeps the pre-exec
high-water mark), and this script holds a JAX model and a file listing. With
--mode mp2 the sum of all the workers' RSS is also sampled from /proc, and
"RSS now" / "highest so far" are main process + its descendants (SDK
workers; with --shard_files, the shard's own process). While it runs, progress (images read so far, rate, ETA, RSS)
is printed from the pipeline's own progress lines (--progress_every_secs),
with the highest RSS sampled so far. At the end every input is checked to be
in exactly one output (predictions or dead letters).

With --shard_files N the pipeline runs as a large local job
(`beam_dl.operations.local_shards`): shards of N files, one complete pipeline run each,
one after another in the same process; progress counts over all shards.
--stop_after_secs ends a run that is taking too long and reports how far it
got (inputs done, rate, ETA, peak RSS so far); with --shard_files, rerunning
with --resume continues from the finished shards.

    python -m benchmarks.bench_scale --sizes 4000,24000
    python -m benchmarks.bench_scale --sizes 10000,100000 [--mode mp2]
    python -m benchmarks.bench_scale --sizes 10000,100000,1000000 --shard_files 50000   # hours on 2 cores

The other two pipelines, peak RSS at each size (`--pipeline`; inputs made here):

  score_sequences  batch, JSON-lines events: keys of weekly CO2 readings (the
                   demo's series, one file per 50 keys), fixed 12-week windows,
                   seq_len 12, --forecast, a 5-step LSTM (sizes = events)
  preprocess       images kind over the same hard-linked 64x64 images as
                   classify_images, decoded to 16x16x3, z-score (sizes = images)

    python -m benchmarks.bench_scale --pipeline score_sequences --sizes 20000,120000
    python -m benchmarks.bench_scale --pipeline preprocess --sizes 2000,12000
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from beam_dl.io.files import iter_inputs
from beam_dl.operations.local_shards import count_jsonl
from benchmarks.bench_flagship import MODES, make_images, make_model

DISTINCT = 2000


PROGRESS = re.compile(rb'classify_images: (?:read\[pid (\d+)\]|(shards)): (\d+)/')


class _SoFar:
  """Inputs read so far, from the pipeline's progress lines: the sum over
  worker pids of each one's count, plus (sharded) the inputs of the shards
  finished before the current one."""

  def __init__(self):
    self.finished, self.counts = 0, {}

  def update(self, text: bytes) -> int:
    for pid, shards, n in PROGRESS.findall(text):
      if shards:  # a shard finished: its workers' counts start again
        self.finished, self.counts = int(n), {}
      else:
        self.counts[pid] = max(self.counts.get(pid, 0), int(n))
    return self.finished + sum(self.counts.values())


TIME = '/usr/bin/time'


def _measured(argv: list[str], peak_file: str) -> list[str]:
  """argv run under GNU time writing the peak RSS (KB) to peak_file, where it is installed."""
  return [TIME, '-f', '%M', '-o', peak_file, *argv] if os.access(TIME, os.X_OK) else argv


def _peak_kb(peak_file: str, usage) -> int:
  """The peak RSS GNU time wrote; without GNU time, wait4's (see the docstring)."""
  try:
    with open(peak_file) as f:
      return int(f.read().split()[-1])
  except (OSError, ValueError, IndexError):
    return usage.ru_maxrss


def _main_pid(pid: int) -> int:
  """The pipeline process: GNU time's child, or pid itself when not wrapped."""
  try:
    with open(f'/proc/{pid}/task/{pid}/children') as f:
      children = f.read().split()
  except OSError:
    return pid
  with open(f'/proc/{pid}/cmdline', 'rb') as f:
    wrapped = f.read().split(b'\0')[0] == TIME.encode()
  return int(children[0]) if wrapped and children else pid


def _rss_kb(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
  except (OSError, StopIteration):
    return 0


def _tree_rss_kb(pid: int) -> int:
  """Sum of VmRSS of all of pid's descendants (the SDK workers, which the
  multi-process DirectRunner starts through `/bin/sh -c`), in KB."""
  children = {}
  for status in glob.glob('/proc/[0-9]*/status'):
    try:
      with open(status) as f:
        fields = dict(line.split(':', 1) for line in f if ':' in line)
    except OSError:
      continue
    children.setdefault(fields.get('PPid', '').strip(), []).append(
      (fields.get('Pid', '').strip(), int(fields.get('VmRSS', '0 kB').split()[0]))
    )
  total, todo = 0, [str(pid)]
  while todo:
    for child, rss in children.get(todo.pop(), []):
      total += rss
      todo.append(child)
  return total


def _keys(output: str, sharded: bool) -> tuple[list, int]:
  """(prediction keys, number of dead letters) in a run's output files."""
  prefix = os.path.join(output, 'shard-*', 'predictions') if sharded else output
  keys, failed = [], 0
  for path in glob.glob(f'{prefix}-[0-9]*-of-*.jsonl'):
    with open(path) as f:
      keys.extend(json.loads(line)['key'] for line in f)
  for path in glob.glob(f'{prefix}_failed-*.jsonl'):
    with open(path) as f:
      failed += sum(1 for _ in f)
  return keys, failed


def run_size(
  root: str,
  model_dir: str,
  size: int,
  mode: str,
  every: float,
  shard_files: int = 0,
  stop_after: float = 0,
  resume: bool = False,
) -> dict:
  folders = -(-size // DISTINCT)
  pattern = make_images(os.path.join(root, f'images-{folders}'), folders * DISTINCT, folders)
  total = sum(1 for _ in iter_inputs(pattern))
  out_dir = os.path.join(root, f'out-{size}-{mode}' + (f'-shards{shard_files}' if shard_files else ''))
  if os.path.exists(out_dir) and not resume:
    shutil.rmtree(out_dir)
  output = os.path.join(out_dir, 'predictions')
  argv = [
    sys.executable,
    '-m',
    'pipelines.classify_images',
    '--input',
    pattern,
    '--model_dir',
    model_dir,
    '--output',
    output,
    '--max_batch_size',
    '128',
    f'--progress_every_secs={every}',
    *MODES[mode],
    *([f'--shard_files={shard_files}'] if shard_files else []),
  ]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get('PYTHONPATH', '')]))
  start = time.perf_counter()
  peak_file = os.path.join(root, f'peak-{os.getpid()}.txt')
  proc = subprocess.Popen(_measured(argv, peak_file), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  so_far, worker_peak_kb, sampled_peak_kb, next_report = _SoFar(), 0, 0, time.perf_counter() + every
  stderr_tail, pending, stopped, done_so_far = b'', b'', False, 0
  os.set_blocking(proc.stderr.fileno(), False)
  while True:
    done, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not poll(): it would reap without rusage
    if done:
      break
    time.sleep(0.5)
    new = proc.stderr.read() or b''
    pending += new
    complete, _, pending = pending.rpartition(b'\n')  # parse whole lines only, each once
    done_so_far = so_far.update(complete)
    stderr_tail = (stderr_tail + new)[-4000:]
    main = _main_pid(proc.pid)
    workers_kb = _tree_rss_kb(main)  # SDK workers (mp2), shard processes (--shard_files)
    worker_peak_kb = max(worker_peak_kb, workers_kb)
    sampled_peak_kb = max(sampled_peak_kb, _rss_kb(main) + workers_kb)
    elapsed = time.perf_counter() - start
    if time.perf_counter() >= next_report:
      next_report += every
      rate = done_so_far / elapsed
      eta = (total - done_so_far) / rate if rate else float('inf')
      print(
        f'  [{size}] {elapsed:7.0f} s: {done_so_far}/{total} read, {rate:.0f} img/s, eta {eta:.0f} s, '
        f'RSS now {(_rss_kb(main) + workers_kb) / 1024:.0f} MB, highest so far '
        f'{sampled_peak_kb / 1024:.0f} MB',
        flush=True,
      )
    if stop_after and elapsed > stop_after and not stopped:
      stopped = True
      print(f'  [{size}] stopping after {elapsed:.0f} s (--stop_after_secs)', flush=True)
      os.kill(main, signal.SIGTERM)  # the pipeline, not GNU time: it reports once its child ends
  seconds = time.perf_counter() - start
  peak_kb = _peak_kb(peak_file, usage)
  proc.returncode = os.waitstatus_to_exitcode(status)
  stderr_tail = (stderr_tail + (proc.stderr.read() or b''))[-4000:]
  row = {
    'images': total,
    'seconds': seconds,
    'peak_rss_mb': peak_kb / 1024,
    'workers_peak_rss_mb': worker_peak_kb / 1024,
    'stopped': stopped,
    'read': done_so_far,
  }
  if stopped:
    return row
  if proc.returncode:
    print(stderr_tail.decode('utf-8', 'replace'))
    raise SystemExit(f'pipeline failed for {size} images')
  keys, failed = _keys(output, bool(shard_files))
  accounted = len(keys) + failed == total and len(set(keys)) == len(keys)
  return {**row, 'predictions': len(keys), 'dead_letters': failed, 'accounted': accounted}


def run_command(argv: list[str]) -> dict:
  """Runs a pipeline command to completion: wall seconds and its peak RSS."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get('PYTHONPATH', '')]))
  start = time.perf_counter()
  with tempfile.NamedTemporaryFile(suffix='.peak') as peak, tempfile.TemporaryFile() as stderr:
    proc = subprocess.Popen(_measured(argv, peak.name), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    peak_kb = _peak_kb(peak.name, usage)
    stderr.seek(0)
    tail = stderr.read()[-4000:]
  seconds = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status):
    print(tail.decode('utf-8', 'replace'))
    raise SystemExit(f'failed: {" ".join(argv)}')
  return {'seconds': seconds, 'peak_rss_mb': peak_kb / 1024}


def make_events(root: str, num: int, per_file: int = 50) -> str:
  """`num` JSON-lines events: keys of weekly CO2 readings, 50 keys a file. Returns the glob."""
  from pipelines import score_sequences_demo as demo

  times, values = demo.load_series()
  keep = ~np.isnan(values)
  times, values = times[keep], values[keep]
  folder = os.path.join(root, f'events-{num}')
  if os.path.isdir(folder):
    return os.path.join(folder, '*.jsonl')
  os.makedirs(folder)
  written, key = 0, 0
  while written < num:
    with open(os.path.join(folder, f'{key // per_file:05d}.jsonl'), 'a') as f:
      n = min(len(times), num - written)
      for t, v in zip(times[:n], values[:n]):
        f.write(json.dumps({'key': f'sensor-{key:05d}', 'time': float(t), 'co2': round(float(v), 2)}) + '\n')
    written, key = written + n, key + 1
  return os.path.join(folder, '*.jsonl')


def run_other(pipeline: str, root: str, size: int) -> dict:
  """Peak RSS and wall time of score_sequences (batch) or preprocess at `size` inputs."""
  out = os.path.join(root, f'out-{pipeline}-{size}')
  shutil.rmtree(out, ignore_errors=True)
  if pipeline == 'score_sequences':
    from pipelines import score_sequences_demo as demo

    model = os.path.join(root, 'co2_lstm')
    if not os.path.exists(model):
      demo.train_model(model, demo.load_series()[1][:120], steps=5)
    argv = [
      sys.executable,
      '-m',
      'pipelines.score_sequences',
      '--input',
      make_events(root, size),
      '--model_dir',
      model,
      '--output',
      os.path.join(out, 'scores'),
      '--event_value_fields',
      'co2',
      '--window',
      'fixed',
      '--window_size',
      str(12 * demo.WEEK),
      '--seq_len',
      '12',
      '--forecast',
      '--min_length',
      '8',
    ]
    prefix = os.path.join(out, 'scores')
  else:
    folders = -(-size // DISTINCT)
    pattern = make_images(os.path.join(root, f'images-{folders}'), folders * DISTINCT, folders)
    argv = [
      sys.executable,
      '-m',
      'pipelines.preprocess',
      '--preprocess_kind',
      'images',
      '--input',
      pattern,
      '--preprocess_image_shape',
      '16,16,3',
      '--transform_dir',
      os.path.join(out, 'transform'),
      '--output',
      os.path.join(out, 'train'),
    ]
    prefix = os.path.join(out, 'train')
    size = folders * DISTINCT
  row = {'inputs': size, **run_command(argv)}
  row['outputs'], row['dead_letters'] = count_jsonl(prefix)  # preprocess writes TFRecords: (0, dead letters)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='10000,100000', help='comma-separated numbers of images (or events)')
  parser.add_argument(
    '--pipeline', choices=['classify_images', 'score_sequences', 'preprocess'], default='classify_images'
  )
  parser.add_argument('--mode', choices=sorted(MODES), default='single')
  parser.add_argument('--every', type=float, default=15.0, help='seconds between progress lines')
  parser.add_argument('--workdir', default=None, help='keep images here (default: a temp dir)')
  parser.add_argument('--shard_files', type=int, default=0, help='run as shards of this many files (0: one run)')
  parser.add_argument('--stop_after_secs', type=float, default=0, help="end a size's run after this long, report")
  parser.add_argument('--resume', action='store_true', help='keep earlier outputs (sharded: finished shards)')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    model_dir = make_model(root) if not os.path.exists(os.path.join(root, 'model')) else os.path.join(root, 'model')
    rows = []
    if args.pipeline != 'classify_images':
      for size in (int(s) for s in args.sizes.split(',')):
        rows.append(run_other(args.pipeline, root, size))
        print(
          f'{args.pipeline} {rows[-1]["inputs"]:>8d} inputs | {rows[-1]["seconds"]:7.1f} s | '
          f'peak RSS {rows[-1]["peak_rss_mb"]:6.0f} MB | {rows[-1]["outputs"]} JSON-lines outputs + '
          f'{rows[-1]["dead_letters"]} dead letters',
          flush=True,
        )
      print(
        f'{args.pipeline} peak RSS {rows[-1]["inputs"]} vs {rows[0]["inputs"]} inputs: '
        f'{rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]:.2f}x'
      )
      return
    for size in (int(s) for s in args.sizes.split(',')):
      row = run_size(root, model_dir, size, args.mode, args.every, args.shard_files, args.stop_after_secs, args.resume)
      mode = args.mode + (f', shards of {args.shard_files}' if args.shard_files else '')
      if row['stopped']:
        rate = row['read'] / row['seconds']
        print(
          f'{row["images"]:>9d} images | stopped after {row["seconds"]:.1f} s with {row["read"]} read | '
          f'{rate:7.1f} img/s | eta {(row["images"] - row["read"]) / max(rate, 1e-9):.0f} s more | '
          f'peak RSS so far {row["peak_rss_mb"]:7.0f} MB (main process) ({mode})',
          flush=True,
        )
        continue
      rows.append(row)
      print(
        f'{row["images"]:>9d} images | {row["seconds"]:8.1f} s | {row["images"] / row["seconds"]:7.1f} img/s | '
        f'peak RSS {row["peak_rss_mb"]:7.0f} MB (main process)'
        + (f' + workers {row["workers_peak_rss_mb"]:.0f} MB' if args.mode != 'single' else '')
        + f' | {row["predictions"]} predictions + {row["dead_letters"]} dead letters, '
        f'every input once: {row["accounted"]} ({mode})',
        flush=True,
      )
    if len(rows) > 1:
      first, last = rows[0], rows[-1]
      print(
        f'peak RSS {last["images"]} vs {first["images"]} images: '
        f'{last["peak_rss_mb"] / first["peak_rss_mb"]:.2f}x ({mode})'
      )


if __name__ == '__main__':
  main()
