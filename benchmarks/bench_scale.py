"""Wall time and peak memory of classify_images as the input grows (issue 18).

Each size runs `python -m pipelines.classify_images` in a fresh subprocess on
the DirectRunner over generated 64x64 PNG/JPEG images (2,000 distinct files,
hard-linked into as many folders as the size needs; see bench_flagship) with
the SmallCNN model dir, batch 128. Peak RSS is the subprocess's own
(`os.wait4` rusage; with --mode mp2 the SDK worker processes are sampled
from /proc too). While it runs, progress (images read so far, rate, ETA, RSS)
is printed from the pipeline's own progress lines (--progress_every_secs). At the end every input is checked to be in exactly one output
(predictions or dead letters).

    python -m benchmarks.bench_scale --sizes 4000,24000
    python -m benchmarks.bench_scale --sizes 10000,100000 [--mode mp2]
    python -m benchmarks.bench_scale --sizes 1000000     # hours on 2 cores
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.bench_flagship import MODES, make_images, make_model

DISTINCT = 2000


PROGRESS = re.compile(rb'classify_images: read\[pid (\d+)\]: (\d+)/')


def _read_so_far(counts: dict, text: bytes) -> int:
  """Inputs read so far, summed over worker pids, from the pipeline's progress lines."""
  for pid, n in PROGRESS.findall(text):
    counts[pid] = max(counts.get(pid, 0), int(n))
  return sum(counts.values())


def _rss_kb(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
  except (OSError, StopIteration):
    return 0


def _tree_rss_kb(pid: int) -> int:
  """Sum of VmRSS of pid's child processes (the SDK workers), in KB."""
  total = 0
  for status in glob.glob('/proc/[0-9]*/status'):
    try:
      with open(status) as f:
        fields = dict(line.split(':', 1) for line in f if ':' in line)
    except OSError:
      continue
    if fields.get('PPid', '').strip() == str(pid):
      total += int(fields.get('VmRSS', '0 kB').split()[0])
  return total


def run_size(root: str, model_dir: str, size: int, mode: str, every: float) -> dict:
  folders = -(-size // DISTINCT)
  pattern = make_images(os.path.join(root, f'images-{folders}'), folders * DISTINCT, folders)
  total = len(glob.glob(pattern))
  out_dir = os.path.join(root, f'out-{size}-{mode}')
  output = os.path.join(out_dir, 'predictions')
  argv = [sys.executable, '-m', 'pipelines.classify_images', '--input', pattern, '--model_dir', model_dir,
          '--output', output, '--max_batch_size', '128', f'--progress_every_secs={every}', *MODES[mode]]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get('PYTHONPATH', '')]))
  start = time.perf_counter()
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  counts, worker_peak_kb, next_report = {}, 0, time.perf_counter() + every
  stderr_tail = b''
  os.set_blocking(proc.stderr.fileno(), False)
  while True:
    done, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not poll(): it would reap without rusage
    if done:
      break
    time.sleep(0.5)
    new = proc.stderr.read() or b''
    done_so_far = _read_so_far(counts, stderr_tail[-200:] + new)
    stderr_tail = (stderr_tail + new)[-4000:]
    if mode != 'single':
      worker_peak_kb = max(worker_peak_kb, _tree_rss_kb(proc.pid))
    if time.perf_counter() >= next_report:
      next_report += every
      elapsed = time.perf_counter() - start
      rate = done_so_far / elapsed
      eta = (total - done_so_far) / rate if rate else float('inf')
      rss = _rss_kb(proc.pid) + (_tree_rss_kb(proc.pid) if mode != 'single' else 0)
      print(f'  [{size}] {elapsed:7.0f} s: {done_so_far}/{total} read, {rate:.0f} img/s, eta {eta:.0f} s, '
            f'RSS now {rss / 1024:.0f} MB', flush=True)
  seconds = time.perf_counter() - start
  peak_kb = usage.ru_maxrss
  proc.returncode = os.waitstatus_to_exitcode(status)
  stderr_tail = (stderr_tail + (proc.stderr.read() or b''))[-4000:]
  if proc.returncode:
    print(stderr_tail.decode('utf-8', 'replace'))
    raise SystemExit(f'pipeline failed for {size} images')
  keys, failed = [], 0
  for path in glob.glob(f'{output}-[0-9]*-of-*.jsonl'):
    with open(path) as f:
      keys.extend(json.loads(line)['key'] for line in f)
  for path in glob.glob(f'{output}_failed-*.jsonl'):
    with open(path) as f:
      failed += sum(1 for _ in f)
  accounted = len(keys) + failed == total and len(set(keys)) == len(keys)
  return {'images': total, 'seconds': seconds, 'peak_rss_mb': peak_kb / 1024,
          'workers_peak_rss_mb': worker_peak_kb / 1024, 'predictions': len(keys), 'dead_letters': failed,
          'accounted': accounted}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='10000,100000', help='comma-separated numbers of images')
  parser.add_argument('--mode', choices=sorted(MODES), default='single')
  parser.add_argument('--every', type=float, default=15.0, help='seconds between progress lines')
  parser.add_argument('--workdir', default=None, help='keep images here (default: a temp dir)')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    model_dir = make_model(root) if not os.path.exists(os.path.join(root, 'model')) else os.path.join(root, 'model')
    rows = []
    for size in (int(s) for s in args.sizes.split(',')):
      row = run_size(root, model_dir, size, args.mode, args.every)
      rows.append(row)
      print(f'{row["images"]:>9d} images | {row["seconds"]:8.1f} s | {row["images"] / row["seconds"]:7.1f} img/s | '
            f'peak RSS {row["peak_rss_mb"]:7.0f} MB (main process)'
            + (f' + workers {row["workers_peak_rss_mb"]:.0f} MB' if args.mode != 'single' else '')
            + f' | {row["predictions"]} predictions + {row["dead_letters"]} dead letters, '
            f'every input once: {row["accounted"]}', flush=True)
    if len(rows) > 1:
      first, last = rows[0], rows[-1]
      print(f'peak RSS {last["images"]} vs {first["images"]} images: '
            f'{last["peak_rss_mb"] / first["peak_rss_mb"]:.2f}x ({args.mode})')


if __name__ == '__main__':
  main()
