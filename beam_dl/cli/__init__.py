"""Command lines of beam_dl pipelines: --help, unknown flags, input checks, exit codes.

Beam's `PipelineOptions(argv)` accepts anything: `--help` shows nothing of a
pipeline's own flags, a misspelled flag is only logged ("Discarding
unparseable args") and the job runs without it, and a glob that matches
nothing runs to an empty output with exit code 0. A pipeline's `run()` goes
through `parse_options()` and `main()` here instead, so that:

- `--help` lists the pipeline's own option groups with their help, and says
  that every Beam option (--runner, ...) is accepted too;
- a flag that no option class defines is refused before the job starts, with
  the closest known flag as a suggestion (as Beam's own validation words it);
- `require_matches()` refuses an input pattern that matches no file, and
  `require_writable()` an output where nothing can be written;
- a flag's bad value is an `OptionsError`, in Beam's parser and in
  `ArgumentParser` (what pipelines with their own flags use): argparse would
  print the whole usage first;
- a user error (`user_errors()`: a bad option, a model directory or registry
  URI that won't load, a file that is missing or can't be written) ends the
  process with one line on stderr and exit code 2.

`parse_options()` also turns on the SDK worker's state cache
(`STATE_CACHE_MB`) unless the command line sizes it: Beam leaves it off on
portable runners, and then every read of user state (the streaming
late-data gate reads its key's cell once per event) is a blocking round
trip to the runner.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, WorkerOptions

from beam_dl.cli.options import OptionsError
from beam_dl.core.deadletter import ERROR_RATE_MARKER, error_rate_message

_log = logging.getLogger('beam_dl')
BEAM_OPTIONS_NOTE = (
  'Every Apache Beam pipeline option is accepted as well (--runner, --direct_num_workers, '
  '--temp_location, ...): see '
  'https://beam.apache.org/documentation/programming-guide/#configuring-pipeline-options'
)


def help_parser(prog: str, description: str, groups: Sequence[type]) -> argparse.ArgumentParser:
  """An argparse parser holding only `groups`' flags, for --help."""
  parser = argparse.ArgumentParser(
    prog=prog, description=description, epilog=BEAM_OPTIONS_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  seen = set()
  for group in groups:
    section = parser.add_argument_group(group.__name__, (group.__doc__ or '').strip().splitlines()[0])
    # Option groups add flags to whatever parser they are handed; give each a
    # view that skips flags an earlier group already showed.
    group._add_argparse_args(_UniqueFlags(section, seen))  # pylint: disable=protected-access
  return parser


class _UniqueFlags:
  """An argument group that ignores a flag added twice (shared option groups)."""

  def __init__(self, group, seen: set):
    self._group, self._seen = group, seen

  def add_argument(self, *names, **kwargs):
    if any(name in self._seen for name in names):
      return None
    self._seen.update(names)
    return self._group.add_argument(*names, **kwargs)

  def __getattr__(self, name):
    return getattr(self._group, name)


class ArgumentParser(argparse.ArgumentParser):
  """argparse for a command's own flags, its errors raised as OptionsError
  (argparse prints the usage, many lines, before its one-line error)."""

  def error(self, message: str):
    raise OptionsError(message)


def _raise_options_error(message: str):
  raise OptionsError(message)


def beam_parser() -> argparse.ArgumentParser:
  """Beam's parser with the flags of every registered PipelineOptions class;
  a bad value is an OptionsError."""
  from apache_beam.options.pipeline_options import _BeamArgumentParser  # pylint: disable=import-outside-toplevel

  parser = _BeamArgumentParser(allow_abbrev=False)
  parser.error = _raise_options_error
  for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def check_known_flags(argv: Sequence[str]) -> None:
  """OptionsError naming each `--flag` in argv that no option class defines,
  with the closest known flag as a suggestion."""
  parser = beam_parser()
  _, unknown = parser.parse_known_args(list(argv))
  flags = [arg.split('=', 1)[0] for arg in unknown if arg.startswith('--')]
  if not flags:
    return
  known = [name for action in parser._actions for name in action.option_strings]  # pylint: disable=protected-access
  hints = []
  for flag in flags:
    close = difflib.get_close_matches(flag, known, n=1)
    hints.append(f'{flag} (did you mean {close[0]}?)' if close else flag)
  raise OptionsError(f'unknown option(s): {", ".join(hints)}; see --help')


def parse_options(
  argv: Optional[Sequence[str]],
  groups: Sequence[type],
  *,
  prog: str,
  description: str,
) -> PipelineOptions:
  """PipelineOptions for `argv`, after --help and the unknown-flag check."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if '-h' in argv or '--help' in argv:
    help_parser(prog, description, groups).print_help()
    raise SystemExit(0)
  check_known_flags(argv)
  options = PipelineOptions(argv)
  default_state_cache(options, argv)
  return options


STATE_CACHE_MB = 100


def default_state_cache(options: PipelineOptions, argv: Sequence[str]) -> None:
  """Sizes the SDK worker's state and side-input cache at STATE_CACHE_MB
  unless argv sizes it (`--max_cache_memory_usage_mb`, Beam's old
  `state_cache_size` experiment).

  Beam 2.77 leaves the cache off (size 0) for portable runners (Flink,
  Spark, Prism, LOOPBACK and PROCESS workers). Without it a worker reads
  user state from the runner on every access, even though Flink hands it a
  cache token: measured on the FlinkRunner at 1,000 events/s, the late-data
  gate made 19,056 blocking state reads in 30 s (a backlog that grew to
  17 s); with the cache, 101 (one per key).
  """
  if any(arg.startswith('--max_cache_memory_usage_mb') or 'state_cache_size=' in arg for arg in argv):
    return
  options.view_as(WorkerOptions).max_cache_memory_usage_mb = STATE_CACHE_MB


def require_matches(pattern: str, flag: str = 'input') -> None:
  """OptionsError when `pattern` matches no file (or the file list `@<path>`
  names none). The listing stops at the first match: the job lists the
  files itself, and a second full listing of a large input before the job
  starts would cost as much as the job's own (bench_flagship: 0.15 s for
  24,000 files)."""
  from beam_dl.io import files  # pylint: disable=import-outside-toplevel

  if files.is_file_list(pattern):
    try:
      listed = len(files.read_file_list(pattern))
    except Exception as e:  # a missing or unreadable list file
      raise OptionsError(f'--{flag} {pattern!r}: {e}') from None
    if not listed:
      raise OptionsError(f'--{flag} {pattern!r}: the file list names no file')
    return
  try:
    matched = FileSystems.match([pattern], limits=[1])[0].metadata_list
  except Exception as e:  # a bad scheme, an unreachable bucket, a malformed glob
    raise OptionsError(f'--{flag} {pattern!r}: {e}') from None
  if not matched:
    raise OptionsError(f'--{flag} {pattern!r} matches no file')


def require_writable(path: str, flag: str = 'output', *, directory: bool = False) -> None:
  """OptionsError when nothing can be written at a local output: the prefix
  `path` (files `<path>-*`), or with `directory=True` the directory `path`.
  Its directory is made if missing; a file in the way, or a directory that
  can't be made or written, is refused before the job starts. Other
  filesystems (gs://, hdfs://) are left to the job."""
  if FileSystems.get_scheme(path) not in (None, 'file'):
    return
  local = os.path.abspath(path[len('file://') :] if path.startswith('file://') else path)
  folder = local if directory else os.path.dirname(local)
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise OptionsError(f'--{flag} {path!r}: cannot make the directory {folder}: {e.strerror or e}') from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise OptionsError(f'--{flag} {path!r}: the directory {folder} is not writable')


class _DropBeamNoise(logging.Filter):
  """Drops log lines a user cannot act on: Beam 2.77's RunInference warns on
  every batch that "Resource module is not available" (its optional
  ModelManager import fails, and takes the `resource` import down with it).
  Also Beam's traceback of a job failed by --max_error_rate: `main` reports
  that as one line. And what each SDK worker process of
  `--direct_running_mode=multi_processing` says at start (relayed as
  "Worker: ..."): that it discards the flags Beam itself does not define
  (ours reach the steps as their arguments, not through the worker's
  options), and that it has no semi-persistent directory (one Beam only
  gives workers on a cluster)."""

  NOISE = ('Resource module is not available',)
  WORKER_NOISE = ('Discarding unparseable args', 'No semi_persistent_directory found')

  def filter(self, record: logging.LogRecord) -> bool:
    if any(str(record.msg).startswith(text) for text in self.NOISE):
      return False
    message = record.getMessage()
    if record.msg == 'Worker: %s' and any(text in message for text in self.WORKER_NOISE):
      return False
    return ERROR_RATE_MARKER not in message


def configure_logging() -> None:
  """INFO from beam_dl (progress, summaries), WARNING and up from everything
  else (Beam's INFO lines about type hints and sinks, MLflow's about its
  store: MLFLOW_LOGGING_LEVEL, unless set), without Beam's noise. The Beam
  fixes in place are logged when the job starts (`run_pipeline`): a command
  refused for its options says that one line only."""
  os.environ.setdefault('MLFLOW_LOGGING_LEVEL', 'WARNING')
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('beam_dl').setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax logs every file it touches
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropBeamNoise())


def user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions that are a user's to fix, not a bug: a bad option, a
  model directory or registry URI that won't load, a file that is missing,
  unreadable or in the way."""
  from beam_dl.models.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  from beam_dl.operations.registry_mlflow import RegistryError  # pylint: disable=import-outside-toplevel

  return (
    OptionsError,
    CheckpointError,
    RegistryError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
  )


def one_line(error: BaseException) -> str:
  """An exception's message on one line (MLflow's and Beam's span several)."""
  return ' '.join(str(error).split()) or type(error).__name__


def main(
  run: Callable[[Sequence[str]], object], name: str, argv: Optional[Sequence[str]] = None, *, logs: bool = True
) -> None:
  """Runs `run(argv)` as the command `name`: INFO logs from beam_dl, Beam's
  chatter at WARNING (`logs=False`: the command sets up logging itself), and
  a user error (`user_errors()`) as one line `name: error: ...` on stderr
  with exit code 2, as argparse does; a job that failed for more dead
  letters than --max_error_rate allows as one such line with exit code 1."""
  if logs:
    configure_logging()
  try:
    run(list(sys.argv[1:] if argv is None else argv))
  except user_errors() as e:
    print(f'{name}: error: {one_line(e)}', file=sys.stderr)
    raise SystemExit(2) from None
  except Exception as e:  # pylint: disable=broad-except
    too_many_failed = error_rate_message(e)  # --max_error_rate: the job failed by design
    if too_many_failed is None:
      raise
    print(f'{name}: error: {" ".join(too_many_failed.split())}', file=sys.stderr)
    raise SystemExit(1) from None
