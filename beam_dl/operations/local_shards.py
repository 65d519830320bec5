"""Large local jobs as input shards, run one after another, resumable.

The embedded DirectRunner (Beam's FnApiRunner) holds some state per input
until a job ends: a Reshuffle's and a Flatten's buffers live in memory for
the whole stage. On 64x64 images that is ~2.5 KB an image, fine for a few
hundred thousand inputs, not for tens of millions. Instead of one run over
everything, `run_in_shards` splits the job's input files (in a fixed order,
so the split is the same every time; see `beam_dl.io.files.iter_inputs`)
into shards of `--shard_files` files and runs the pipeline over each in
turn (`python -m <pipeline>` in a process of its own: `module_runner`), so
memory is that of one shard whatever the input size (the listing itself
holds one directory's names at a time). Each shard is a complete pipeline run with
its own outputs:

  <output>/shards.json                   the plan: input, shard size, input count and digest
  <output>/inputs/shard-NNNNN.txt        each shard's input paths (a file list, --input @...)
  <output>/shard-NNNNN/<name>-*.jsonl    a finished shard's outputs (<name>: basename of --output)
  <output>/shard-NNNNN/_SUCCESS.json     its counts: inputs, outputs, dead letters, seconds
  <output>/shard-NNNNN.partial/          a shard being written; renamed on success
  <output>/summary.json                  counts over all shards once every shard is done

Resuming: rerun the same command. Shards already renamed are skipped; a
shard that was running when the job crashed (its `.partial` directory) is
deleted and redone, so no output is written twice. A rerun with a different
input set or shard size is refused (its shards would overlap the old ones).

Progress: one line per finished shard with inputs done over all shards,
rate and ETA; the pipeline's own --progress_every_secs lines run within each
shard. Local output directories only (the finish is an atomic rename).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from beam_dl.cli.options import IOOptions, OptionsError
from beam_dl.core.deadletter import failed_output
from beam_dl.io import files as files_lib
from beam_dl.operations.progress import Progress

_log = logging.getLogger('beam_dl.operations.local_shards')
PLAN = 'shards.json'
SUMMARY = 'summary.json'
SUCCESS = '_SUCCESS.json'
PARTIAL = '.partial'
# The flags a shard's argv gets from the driver, not from the user's command.
_REPLACED = ('input', 'output', 'shard_files')


class LocalShardOptions(PipelineOptions):
  """Large local jobs: run the input in shards of files, one after another, resumable."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
      '--shard_files',
      type=int,
      default=0,
      help='Run the job as shards of this many input files, one complete pipeline run each, '
      'into <output>/shard-NNNNN/; a rerun skips finished shards (0: one run, the default). '
      'See docs/large_local_jobs.md.',
    )


@dataclass(frozen=True)
class ShardCounts:
  """What one finished shard read and wrote (its _SUCCESS.json)."""

  shard: int
  inputs: int
  outputs: int
  dead_letters: int
  seconds: float


@dataclass(frozen=True)
class ShardsSummary:
  """Counts over every shard of a job (its summary.json)."""

  shards: int
  inputs: int
  outputs: int
  dead_letters: int
  ran: int  # shards run by this invocation
  skipped: int  # shards finished by an earlier one
  seconds: float  # this invocation's wall time


def plan_shards(paths: Iterable[str], shard_files: int) -> Iterator[list[str]]:
  """`paths`, in their order, cut into consecutive shards of `shard_files`
  (the last may be short); holds one shard at a time."""
  if shard_files < 1:
    raise OptionsError(f'--shard_files must be at least 1, got {shard_files}')
  shard = []
  for path in paths:
    shard.append(path)
    if len(shard) == shard_files:
      yield shard
      shard = []
  if shard:
    yield shard


def shard_argv(argv: Sequence[str], input_pattern: str, output: str, extra: Sequence[str] = ()) -> list[str]:
  """`argv` with --input/--output replaced, --shard_files dropped, `extra` added."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    name = arg[2:].split('=', 1)[0] if arg.startswith('--') else None
    if name in _REPLACED:
      skip = '=' not in arg
      continue
    out.append(arg)
  return out + list(extra) + [f'--input={input_pattern}', f'--output={output}']


def count_jsonl(prefix: str) -> tuple[int, int]:
  """(records, dead letters) in the JSON-lines files WriteJsonLines wrote at `prefix`."""

  def lines(pattern):
    total = 0
    for path in glob.glob(pattern):
      with open(path, 'rb') as f:
        total += sum(1 for _ in f)
    return total

  return (
    lines(f'{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9]-of-*.jsonl'),
    lines(f'{glob.escape(failed_output(prefix))}-[0-9]*-of-*.jsonl'),
  )


class _Layout:
  """Paths under a sharded job's directory."""

  def __init__(self, job_dir: str):
    self.job_dir = job_dir
    self.name = os.path.basename(os.path.normpath(job_dir)) or 'out'

  def list_file(self, k: int) -> str:
    return os.path.join(self.job_dir, 'inputs', f'shard-{k:05d}.txt')

  def done_dir(self, k: int) -> str:
    return os.path.join(self.job_dir, f'shard-{k:05d}')

  def partial_dir(self, k: int) -> str:
    return self.done_dir(k) + PARTIAL

  def counts(self, k: int) -> Optional[ShardCounts]:
    """The shard's counts if it finished, else None."""
    try:
      with open(os.path.join(self.done_dir(k), SUCCESS)) as f:
        return ShardCounts(**json.load(f))
    except FileNotFoundError:
      return None


def _prepare(layout: _Layout, pattern: str, shard_files: int) -> list[int]:
  """Lists the inputs (`iter_inputs`: a fixed order, one directory in memory
  at a time) into the shards' file lists and writes the plan, or checks them
  against an earlier run's plan; returns each shard's number of inputs."""
  plan_path = os.path.join(layout.job_dir, PLAN)
  earlier = None
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      earlier = json.load(f)
  else:
    os.makedirs(os.path.dirname(layout.list_file(0)), exist_ok=True)
  digest, sizes = hashlib.sha256(), []
  for k, shard in enumerate(plan_shards(files_lib.iter_inputs(pattern), shard_files)):
    for path in shard:
      digest.update(path.encode('utf-8') + b'\n')
    if earlier is None:
      files_lib.write_file_list(layout.list_file(k), shard)
    sizes.append(len(shard))
  if not sizes:
    raise OptionsError(f'--input {pattern!r} matches no file')
  plan = {
    'input': pattern,
    'shard_files': shard_files,
    'inputs': sum(sizes),
    'shards': len(sizes),
    'inputs_sha256': digest.hexdigest(),
  }
  if earlier is None:
    _write_json(plan_path, plan)  # last: a plan on disk means the file lists are complete
    return sizes
  changed = [k for k in ('shard_files', 'inputs', 'inputs_sha256') if earlier.get(k) != plan[k]]
  if changed:
    raise OptionsError(
      f'{layout.job_dir} holds a sharded job planned for other inputs or another shard size '
      f'({", ".join(changed)} differ); use a new --output, or delete it to start over'
    )
  return sizes


def _write_json(path: str, value: dict) -> None:
  """Writes `value` to `path` atomically (temp name, then rename)."""
  temp = f'{path}.tmp-{os.getpid()}'
  with open(temp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temp, path)


class ShardFailed(RuntimeError):
  """A shard's pipeline process exited with an error (its own output says why)."""


def _parent_death_signal() -> Optional[Callable[[], None]]:
  """A preexec_fn that makes the shard's process end when the driver ends
  (Linux prctl PR_SET_PDEATHSIG), so a killed job leaves no shard running into
  a directory a rerun deletes. prctl is looked up here, before the fork: the
  child only calls it."""
  if not sys.platform.startswith('linux'):
    return None
  import ctypes  # pylint: disable=import-outside-toplevel

  prctl = ctypes.CDLL(None, use_errno=True).prctl
  return lambda: prctl(1, signal.SIGTERM)


def module_runner(module: str) -> Callable[[list[str]], None]:
  """A `run` for `run_in_shards` that runs each shard as `python -m module argv`
  in its own process, so nothing one shard leaves in memory (Beam's runner,
  XLA, the allocator's free lists) carries into the next: run in one process,
  peak RSS crept up ~8 MB per 50,000-image shard (benchmarks/RESULTS.md)."""

  def run(argv: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, '-m', module, *argv], preexec_fn=_parent_death_signal())
    try:
      code = proc.wait()
    finally:
      if proc.poll() is None:  # the driver was interrupted: end the shard with it
        proc.terminate()
        proc.wait()
    if code:
      raise ShardFailed(f'python -m {module} exited with status {code}')

  return run


def _run_shard(
  run: Callable[[list[str]], object], argv: Sequence[str], layout: _Layout, k: int, size: int, extra: Sequence[str]
) -> ShardCounts:
  """Runs shard k into its .partial directory, records its counts, renames it done."""
  partial = layout.partial_dir(k)
  if os.path.exists(partial):  # a crashed earlier attempt: redo it from nothing
    _log.info('shard %05d: removing an unfinished attempt', k)
    shutil.rmtree(partial)
  os.makedirs(partial)
  prefix = os.path.join(partial, layout.name)
  start = time.perf_counter()
  run(shard_argv(argv, files_lib.FILE_LIST_PREFIX + layout.list_file(k), prefix, extra))
  outputs, dead = count_jsonl(prefix)
  counts = ShardCounts(k, size, outputs, dead, round(time.perf_counter() - start, 3))
  _write_json(os.path.join(partial, SUCCESS), asdict(counts))
  os.rename(partial, layout.done_dir(k))  # the commit point
  return counts


def run_in_shards(
  run: Callable[[list[str]], object],
  argv: Optional[Sequence[str]],
  options: PipelineOptions,
  name: str,
  extra: Sequence[str] = (),
) -> ShardsSummary:
  """Runs `run(argv)` once per input shard (see the module docstring); returns the summary.

  `run` is the pipeline's own entry point (in this process), or
  `module_runner(module)` (a process per shard); each shard's argv is the user's
  with --input naming the shard's file list, --output inside the shard's
  directory and `extra` flags (e.g. the --input_format the pipeline inferred
  from the user's pattern, which a file list's name no longer shows). An
  exception from a shard ends the job, leaving finished shards in place for
  a rerun.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  io = options.view_as(IOOptions)
  shard_files = options.view_as(LocalShardOptions).shard_files
  if not io.input or not io.output:
    raise OptionsError('--shard_files needs --input and --output')
  if '://' in io.output:
    raise OptionsError(f'--shard_files writes to a local directory; --output {io.output!r} is not local')
  layout = _Layout(io.output)
  if os.path.isfile(io.output):
    raise OptionsError(f'--output {io.output!r} is a file; with --shard_files it is a directory')
  os.makedirs(io.output, exist_ok=True)
  start = time.perf_counter()
  sizes = _prepare(layout, io.input, shard_files)
  total, shards = sum(sizes), len(sizes)
  _log.info(
    '%s: %d inputs in %d shards of up to %d, listed in %.1f s',
    name,
    total,
    shards,
    shard_files,
    time.perf_counter() - start,
  )
  finished = {k: layout.counts(k) for k in range(shards)}
  skipped = [k for k, c in finished.items() if c is not None]
  progress = Progress(total, name=f'{name}: shards', unit='inputs', every_secs=0)
  if skipped:
    _log.info('%s: %d of %d shards finished by an earlier run; resuming', name, len(skipped), shards)
    progress.update(sum(sizes[k] for k in skipped), shards=f'{len(skipped)}/{shards}')
  done = len(skipped)
  for k, size in enumerate(sizes):
    if finished[k] is not None:
      continue
    try:
      finished[k] = _run_shard(run, argv, layout, k, size, extra)
    except BaseException:
      _log.error(
        '%s: shard %05d of %d failed; finished shards are kept: rerun the same command to resume', name, k, shards
      )
      raise
    done += 1
    progress.update(size, shards=f'{done}/{shards}')
  counts = list(finished.values())
  summary = ShardsSummary(
    shards=shards,
    inputs=total,
    outputs=sum(c.outputs for c in counts),
    dead_letters=sum(c.dead_letters for c in counts),
    ran=shards - len(skipped),
    skipped=len(skipped),
    seconds=round(time.perf_counter() - start, 3),
  )
  _write_json(os.path.join(layout.job_dir, SUMMARY), asdict(summary))
  _log.info(
    '%s: %d shards, %d inputs -> %d outputs + %d dead letters (%d shards run now, %d from an earlier run) in %.1f s',
    name,
    summary.shards,
    summary.inputs,
    summary.outputs,
    summary.dead_letters,
    summary.ran,
    summary.skipped,
    summary.seconds,
  )
  return summary
