"""Matching input files so that every match is read or reported.

  MatchFileChunks(pattern)     -> `.chunks` (lists of (path, size, mtime)), `.failed`
  MatchReadableFiles(pattern)  -> `.files` (fileio.ReadableFile), `.failed`

A match (`FileSystems.match`, as `fileio.MatchFiles`) + `ReadMatches`, with
a reshuffle between them so a runner spreads the files over workers, plus
one dead letter (stage 'read') for each
entry that matches the glob but that Beam's match skips silently: a
directory, a dangling symlink (see `beam_dl.io.files`). A reader that
handles many files per element takes the chunks and makes each file's
`ReadableFile` itself (`readable_files`): one Beam step per chunk instead
of two per file. Readers downstream
open each file with `beam_dl.io.files.open_regular`, which reports FIFOs,
devices and unreadable files the same way.

A file list (`@<path>`, one input path a line; `beam_dl.operations.local_shards` gives
each shard one) is read on a worker and each listed path is taken literally:
a regular file is read, anything else is one dead letter with the same
reason a glob match would give it.
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import BeamIOError, FileMetadata
from apache_beam.io.filesystems import CompressionTypes, FileSystems
from apache_beam.metrics import Metrics

from beam_dl.core.deadletter import dead_letter
from beam_dl.core.element_types import DeadLetter
from beam_dl.io import files as files_lib

NAMESPACE = 'beam_dl.files'
# Matches cross the reshuffle in chunks: a reshuffle costs six Beam steps and
# a coder round trip per element, ~10% of bench_flagship's per-image time
# when every image crossed alone. At most MAX_CHUNK matches per chunk, and
# at least MIN_CHUNKS chunks when there are that many files, so every worker
# still gets a share (a few large TFRecord files cross one by one).
MAX_CHUNK = 64
MIN_CHUNKS = 32


class ReadableFiles(NamedTuple):
  """MatchReadableFiles' outputs: the files to read and the unreadable matches."""

  files: beam.PCollection
  failed: beam.PCollection


def unreadable_dead_letter(path: str, reason: str) -> dict:
  """The dead letter of an input file that can't be read, counted."""
  Metrics.counter(NAMESPACE, 'unreadable').inc()
  return dead_letter(path, 'read', reason, file=path)


def _unlisted(pattern: str):
  return [unreadable_dead_letter(path, reason) for path, reason in files_lib.unlisted_entries(pattern)]


def in_chunks(items: list, max_chunk: int = MAX_CHUNK, min_chunks: int = MIN_CHUNKS) -> list[list]:
  """`items` in order, cut into chunks of equal size (the last may be
  shorter): at most `max_chunk`, and small enough to make `min_chunks`."""
  size = max(1, min(max_chunk, len(items) // min_chunks))
  return [items[i : i + size] for i in range(0, len(items), size)]


def match_in_chunks(pattern: str) -> list[list[tuple[str, int, float]]]:
  """`FileSystems.match(pattern)`'s matches as (path, size, mtime), `in_chunks`.
  An empty match of a pattern without a wildcard is an error, as in
  `fileio.MatchFiles`.

  Plain tuples, not FileMetadata: Beam's coder encodes str, int and float
  itself but pickles each FileMetadata, twice per file across the reshuffle
  (bench_flagship: ~49,000 pickle calls for 24,000 images)."""
  metadata = FileSystems.match([pattern])[0].metadata_list
  if not metadata and not fileio.EmptyMatchTreatment.allow_empty_match(
    pattern, fileio.EmptyMatchTreatment.ALLOW_IF_WILDCARD
  ):
    raise BeamIOError(f'Empty match for pattern {pattern}. Disallowed.')
  return in_chunks([_as_tuple(m) for m in metadata])


def _as_tuple(metadata: FileMetadata) -> tuple[str, int, float]:
  return metadata.path, metadata.size_in_bytes, metadata.last_updated_in_seconds


def readable_files(
  chunk: list[tuple[str, int, float]], compression_type: str = CompressionTypes.AUTO
) -> list[fileio.ReadableFile]:
  """One chunk of (path, size, mtime) -> each file's `fileio.ReadableFile`
  (what `fileio.ReadMatches` makes of its FileMetadata), in order."""
  return [fileio.ReadableFile(FileMetadata(path, size, mtime), compression_type) for path, size, mtime in chunk]


class _ListedFilesFn(beam.DoFn):
  """A file list's pattern -> its readable paths as (path, size, mtime),
  `in_chunks` (as `match_in_chunks`); each unreadable path -> 'failed'."""

  def process(self, pattern: str):
    readable = []
    for path in files_lib.read_file_list(pattern):
      listed = files_lib.listed_metadata(path)
      if isinstance(listed, str):
        yield beam.pvalue.TaggedOutput('failed', unreadable_dead_letter(path, listed))
      else:
        readable.append(_as_tuple(listed))
    yield from in_chunks(readable)


class FileChunks(NamedTuple):
  """MatchFileChunks' outputs: chunks of files to read, and the unreadable matches."""

  chunks: beam.PCollection
  failed: beam.PCollection


class MatchFileChunks(beam.PTransform):
  """A file pattern (or a file list, `@<path>`) -> `.chunks`, lists of
  (path, size, mtime) spread over workers by a reshuffle (`readable_files`
  opens them), and `.failed`."""

  def __init__(self, file_pattern: str):
    super().__init__()
    self._pattern = file_pattern

  def expand(self, pbegin) -> FileChunks:
    if files_lib.is_file_list(self._pattern):
      listed = (
        pbegin
        | 'FileList' >> beam.Create([self._pattern])
        | 'ListedFiles' >> beam.ParDo(_ListedFilesFn()).with_outputs('failed', main='files')
      )
      chunks, failed = listed.files, listed.failed
    else:
      pattern = pbegin | 'Pattern' >> beam.Create([self._pattern])
      chunks = pattern | 'MatchFiles' >> beam.FlatMap(match_in_chunks)
      failed = pattern | 'UnlistedMatches' >> beam.FlatMap(_unlisted).with_output_types(DeadLetter)
    return FileChunks(chunks | 'Reshuffle' >> beam.Reshuffle(), failed)


class MatchReadableFiles(beam.PTransform):
  """A file pattern (or a file list, `@<path>`) -> `.files` (ReadableFile per
  match) and `.failed`."""

  def __init__(self, file_pattern: str, compression_type: str = CompressionTypes.AUTO):
    super().__init__()
    self._pattern = file_pattern
    self._compression = compression_type

  def expand(self, pbegin) -> ReadableFiles:
    matched = pbegin | 'Chunks' >> MatchFileChunks(self._pattern)
    files = matched.chunks | 'ReadMatches' >> beam.FlatMap(readable_files, self._compression)
    return ReadableFiles(files, matched.failed)
