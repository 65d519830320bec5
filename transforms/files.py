"""Matching input files so that every match is read or reported.

  MatchReadableFiles(pattern)  -> `.files` (fileio.ReadableFile), `.failed`

`fileio.MatchFiles` + `ReadMatches` (a reshuffle between them, so a runner
spreads the files over workers), plus one dead letter (stage 'read') for each
entry that matches the glob but that Beam's match skips silently: a
directory, a dangling symlink (see `beam_dl.io.files`). Readers downstream
open each file with `beam_dl.io.files.open_regular`, which reports FIFOs,
devices and unreadable files the same way.
"""
from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import CompressionTypes
from apache_beam.metrics import Metrics

from beam_dl.deadletter import dead_letter
from beam_dl.element_types import DeadLetter
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


class MatchReadableFiles(beam.PTransform):
  """A file pattern -> `.files` (ReadableFile per match) and `.failed`."""

  def __init__(self, file_pattern: str, compression_type: str = CompressionTypes.AUTO):
    super().__init__()
    self._pattern = file_pattern
    self._compression = compression_type

  def expand(self, pbegin) -> ReadableFiles:
    files = (pbegin
             | 'MatchFiles' >> fileio.MatchFiles(self._pattern)
             | 'Reshuffle' >> beam.Reshuffle()
             | 'ReadMatches' >> fileio.ReadMatches(self._compression, skip_directories=False))
    failed = (pbegin
              | 'Pattern' >> beam.Create([self._pattern])
              | 'UnlistedMatches' >> beam.FlatMap(_unlisted).with_output_types(DeadLetter))
    return ReadableFiles(files, failed)
