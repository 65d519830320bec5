"""Matching input files so that every match is read or reported.

  MatchReadableFiles(pattern)  -> `.files` (fileio.ReadableFile), `.failed`

`fileio.MatchFiles` + `ReadMatches` (a reshuffle between them, so a runner
spreads the files over workers), plus one dead letter (stage 'read') for each
entry that matches the glob but that Beam's match skips silently: a
directory, a dangling symlink (see `beam_dl.io.files`). Readers downstream
open each file with `beam_dl.io.files.open_regular`, which reports FIFOs,
devices and unreadable files the same way.

A file list (`@<path>`, one input path a line; `beam_dl.local_shards` gives
each shard one) is read on a worker and each listed path is taken literally:
a regular file is read, anything else is one dead letter with the same
reason a glob match would give it.
"""
from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import CompressionTypes
from apache_beam.metrics import Metrics

from beam_dl.deadletter import dead_letter
from beam_dl.io import files as files_lib

NAMESPACE = 'beam_dl.files'


class ReadableFiles(NamedTuple):
  """MatchReadableFiles' outputs: the files to read and the unreadable matches."""

  files: beam.PCollection
  failed: beam.PCollection


def unreadable_dead_letter(path: str, reason: str) -> dict:
  """The dead letter of an input file that can't be read, counted."""
  Metrics.counter(NAMESPACE, 'unreadable').inc()
  return dead_letter(path, 'read', reason, file=path)


def _unlisted(pattern: str):
  return [unreadable_dead_letter(path, reason)
          for path, reason in files_lib.unlisted_entries(pattern)]


class _ListedFilesFn(beam.DoFn):
  """A file list's pattern -> FileMetadata per listed path; the unreadable -> 'failed'."""

  def process(self, pattern: str):
    for path in files_lib.read_file_list(pattern):
      listed = files_lib.listed_metadata(path)
      if isinstance(listed, str):
        yield beam.pvalue.TaggedOutput('failed', unreadable_dead_letter(path, listed))
      else:
        yield listed


class MatchReadableFiles(beam.PTransform):
  """A file pattern (or a file list, `@<path>`) -> `.files` (ReadableFile per
  match) and `.failed`."""

  def __init__(self, file_pattern: str, compression_type: str = CompressionTypes.AUTO):
    super().__init__()
    self._pattern = file_pattern
    self._compression = compression_type

  def expand(self, pbegin) -> ReadableFiles:
    if files_lib.is_file_list(self._pattern):
      listed = (pbegin
                | 'FileList' >> beam.Create([self._pattern])
                | 'ListedFiles' >> beam.ParDo(_ListedFilesFn()).with_outputs('failed', main='files'))
      files = (listed.files
               | 'Reshuffle' >> beam.Reshuffle()
               | 'ReadMatches' >> fileio.ReadMatches(self._compression, skip_directories=False))
      return ReadableFiles(files, listed.failed)
    files = (pbegin
             | 'MatchFiles' >> fileio.MatchFiles(self._pattern)
             | 'Reshuffle' >> beam.Reshuffle()
             | 'ReadMatches' >> fileio.ReadMatches(self._compression, skip_directories=False))
    failed = (pbegin
              | 'Pattern' >> beam.Create([self._pattern])
              | 'UnlistedMatches' >> beam.FlatMap(_unlisted).with_output_types(dict))
    return ReadableFiles(files, failed)
