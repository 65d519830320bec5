"""Input files that match a glob but cannot be read, found and named.

Beam's file matching skips some matches without a word: on the local
filesystem `FileSystems.match` lists with `os.walk`, so a directory whose name
matches the glob is never listed, and a dangling symlink is dropped because
its size can't be read. A FIFO is listed and then blocks forever when opened.
These helpers give each such entry a reason, so readers can report it as a
dead letter (stage 'read') instead of losing it or hanging:

  unlisted_entries(pattern)  -> [(path, reason)] Beam's match skipped
  open_regular(readable)     -> the opened file, or FileReadError(reason)
  read_all(readable)         -> its bytes, or FileReadError(reason)
  content(data)              -> bytes as they are, a ReadableFile read_all

An input may also be a file list, `@<path>`: a text file naming one input
path per line (what `beam_dl.operations.local_shards` hands each shard). Its paths are
taken literally, never as globs:

  iter_inputs(pattern)       -> every path a pattern (or file list) names, in a fixed order
  names_tfrecords(pattern)   -> whether it names TFRecord files (--input_format auto)
  write_file_list(path, ps)  /  read_file_list(pattern)
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from typing import BinaryIO, Iterator

from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from beam_dl.core.deadletter import describe

_KINDS = (
  (stat.S_ISDIR, 'a directory'),
  (stat.S_ISFIFO, 'a FIFO (named pipe)'),
  (stat.S_ISSOCK, 'a socket'),
  (stat.S_ISCHR, 'a character device'),
  (stat.S_ISBLK, 'a block device'),
)


# What reading an opened file can raise: I/O errors (EIO), and a damaged or
# truncated compressed stream (zlib.error, EOFError from gzip/bz2).
READ_ERRORS = (OSError, EOFError, zlib.error)


class FileReadError(IOError):
  """A matched path whose bytes cannot be read; the message is the reason."""


def _is_local(path: str) -> bool:
  """Whether Beam serves `path` from the local filesystem. A path without a
  scheme is LocalFileSystem's (scheme None) without asking
  `FileSystems.get_filesystem`, which walks Beam's plugins on every call."""
  if FileSystems.get_scheme(path) is None:
    return True
  return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)


def not_regular_reason(path: str) -> str | None:
  """Why a local `path` is not a readable regular file, or None if it is one."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    if os.path.islink(path):
      return f'dangling symlink (points to {os.readlink(path)!r}, which does not exist)'
    return 'file vanished after it was matched'
  except OSError as e:
    return f'cannot stat: {describe(e)}'
  for test, kind in _KINDS:
    if test(mode):
      return f'not a regular file: {kind}'
  return None


def unlisted_entries(pattern: str) -> list[tuple[str, str]]:
  """(path, reason) of each local entry matching `pattern` that Beam's match skips.

  Replays `FileSystem.match`'s listing (the walk under the pattern's fixed
  prefix) for the entries it leaves out, directories and entries whose size
  can't be read, and filters them with Beam's own `match_files`, so "matches
  the glob" means exactly what it means to `fileio.MatchFiles`. Other
  filesystems (object stores) have no such entries: [].
  """
  if not _is_local(pattern):
    return []
  if pattern.endswith(os.sep):  # as FileSystem.match: a directory means its entries
    pattern += '*'
  prefix = re.match(r'^[^[*?]*', pattern).group(0)
  if prefix == pattern:  # no glob: Beam's match stats the path itself
    return []
  fs = FileSystems.get_filesystem(pattern)
  root = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
  if not os.path.isdir(root or '.'):
    return []
  skipped = [FileMetadata(path, 0) for path in _entries_beam_skips(root or '.')]
  return sorted(
    (m.path, not_regular_reason(m.path) or 'not listed by the file match') for m in fs.match_files(skipped, pattern)
  )


def _entries_beam_skips(root: str) -> Iterator[str]:
  """Paths under `root` that Beam's local listing (os.walk, then a size per
  file) leaves out: directories, and files whose size can't be read
  (dangling symlinks). The walk is os.walk's (no descent into symlinked
  directories, unreadable directories passed over); a regular file's
  directory entry says it is one, so only the other entries are stat'ed
  (24,000 stat calls fewer for bench_flagship's 24,000 images)."""
  pending = [root]
  while pending:
    try:
      entries = os.scandir(pending.pop())
    except OSError:
      continue
    with entries:
      for entry in entries:
        try:
          is_dir = entry.is_dir()
        except OSError:
          is_dir = False
        if is_dir:
          yield entry.path
          if not entry.is_symlink():
            pending.append(entry.path)
        elif not entry.is_file(follow_symlinks=False):
          try:
            os.path.getsize(entry.path)
          except OSError:  # what Beam's listing drops silently
            yield entry.path


FILE_LIST_PREFIX = '@'
_TFRECORD_NAME = re.compile(r'\.tfr(ecords?)?\b')


def names_tfrecords(pattern: str) -> bool:
  """Whether an input pattern names TFRecord files (`.tfr`, `.tfrecord`,
  `.tfrecords`), not files of their own format such as images: how the
  pipelines' `--input_format auto` decides."""
  return bool(_TFRECORD_NAME.search(pattern))


def is_file_list(pattern: str) -> bool:
  """Whether an input pattern names a file list (`@<path>`) rather than a glob."""
  return pattern.startswith(FILE_LIST_PREFIX)


def read_file_list(pattern: str) -> list[str]:
  """The paths in the file list `@<path>`, one a line, in the list's order."""
  with FileSystems.open(pattern[len(FILE_LIST_PREFIX) :], mime_type='text/plain') as f:
    return [line for line in f.read().decode('utf-8').split('\n') if line]


def write_file_list(path: str, paths: list[str]) -> str:
  """Writes `paths` as a file list at `path`; returns the pattern (`@<path>`) naming it."""
  bad = [p for p in paths if '\n' in p or not p]
  if bad:
    raise ValueError(f'a file list cannot hold an empty path or one with a newline: {bad[0]!r}')
  with FileSystems.create(path, mime_type='text/plain') as f:
    f.write(''.join(f'{p}\n' for p in paths).encode('utf-8'))
  return FILE_LIST_PREFIX + path


def iter_inputs(pattern: str) -> Iterator[str]:
  """Every input path `pattern` names, in an order that is the same on every
  call for the same files: what `fileio.MatchFiles` lists plus the entries it
  skips (`unlisted_entries`: readers report them as dead letters), or a file
  list's paths in its order. A job split by these paths sees each input the
  unsplit job sees, once.

  A local glob is walked like Beam's own match (the walk under the pattern's
  fixed prefix, filtered by Beam's `match_files`), directory by directory in
  sorted name order, holding one directory's names at a time: listing a
  million files costs no more memory than listing a thousand. Other
  filesystems list through Beam's match, sorted.
  """
  if is_file_list(pattern):
    yield from read_file_list(pattern)
    return
  if pattern.endswith(os.sep):  # as FileSystem.match: a directory means its entries
    pattern += '*'
  prefix = re.match(r'^[^[*?]*', pattern).group(0)
  if not _is_local(pattern) or prefix == pattern:
    yield from sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    return
  fs = FileSystems.get_filesystem(pattern)
  root = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
  if not os.path.isdir(root or '.'):
    return
  for dirpath, dirnames, filenames in os.walk(root or '.'):
    dirnames.sort()  # os.walk descends in this order
    entries = [FileMetadata(os.path.join(dirpath, name), 0) for name in sorted(dirnames + filenames)]
    yield from (m.path for m in fs.match_files(entries, pattern))


def listed_metadata(path: str) -> FileMetadata | str:
  """A listed input's FileMetadata, or the reason it cannot be read (a
  directory, a dangling symlink, a FIFO, a path that vanished)."""
  if _is_local(path):
    reason = not_regular_reason(path)
    if reason:
      return reason
  try:
    return FileSystems.get_filesystem(path).metadata(path)
  except Exception as e:  # BeamIOError wrapping the filesystem's own error
    return f'cannot stat: {describe(e)}'


def open_regular(readable) -> BinaryIO:
  """Opens a `fileio.ReadableFile` as bytes, refusing what is not a regular file.

  Raises FileReadError (never blocks on a FIFO) with the reason.
  """
  path = readable.metadata.path
  if _is_local(path):
    reason = not_regular_reason(path)
    if reason:
      raise FileReadError(reason)
  try:
    return readable.open(mime_type='application/octet-stream')
  except OSError as e:
    raise FileReadError(f'cannot open: {describe(e)}') from None


def _read_local_regular(readable) -> bytes | None:
  """The bytes of a local, uncompressed regular file, opened once (open,
  fstat, read: half the cost of the checked `open_regular` path, which
  stats, then goes through Beam's filesystem layer); None for anything else
  (not local, compressed, not a regular file, an error), which the checked
  path then reads or names. O_NONBLOCK: opening a FIFO must not block."""
  path = readable.metadata.path
  compression = readable._compression or CompressionTypes.AUTO  # pylint: disable=protected-access
  if compression == CompressionTypes.AUTO:
    compression = CompressionTypes.detect_compression_type(path)
  if compression != CompressionTypes.UNCOMPRESSED or not _is_local(path):
    return None
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except OSError:
    return None
  with open(fd, 'rb') as f:
    try:
      if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
      return f.read()
    except READ_ERRORS:
      return None


def read_all(readable) -> bytes:
  """The whole content of a `fileio.ReadableFile`, or FileReadError(reason)."""
  data = _read_local_regular(readable)
  if data is not None:
    return data
  with open_regular(readable) as f:
    try:
      return f.read()
    except READ_ERRORS as e:  # EIO, a permission the open did not check, a bad gzip
      raise FileReadError(f'read failed: {describe(e)}') from None


def content(data) -> bytes:
  """Encoded input as bytes: bytes as they are, a `fileio.ReadableFile` read
  whole (`read_all`: FileReadError with the reason). Readers that defer the
  read hand ReadableFiles to the step that decodes them."""
  return data if isinstance(data, (bytes, bytearray, memoryview)) else read_all(data)


def content_size(data) -> int:
  """Bytes of encoded input: its length, or a ReadableFile's listed size."""
  return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else data.metadata.size_in_bytes
