"""Writers for pipeline outputs."""

from __future__ import annotations

import os

import apache_beam as beam
from apache_beam.io import fileio

import beam_dl  # noqa: F401  (its import fixes Beam's time-based flush: beam_dl/beam_fixes/output_flush.py)
from beam_dl.core.element_types import Record
from beam_dl.formats.jsonl import JsonLineCoder, json_line

# What Beam's pre_finalize deletes as stale output of an earlier run. Beam
# derives `<prefix>-*-of-NNNNN.jsonl` from the shard template, and that glob
# also matches any other file sharing the prefix (dead letters were once
# `<prefix>-failed-...`: on a runner that finalizes the dead-letter write
# first, Prism at random, they were deleted). Only the 5-digit shards go.
EXACT_SHARD_GLOB = '-' + '[0-9]' * 5 + '-of-%(num_shards)05d'


@beam.typehints.with_input_types(Record)
@beam.typehints.with_output_types(str)
class WriteJsonLines(beam.PTransform):
  """Writes dicts as JSON lines to `<prefix>-SSSSS-of-NNNNN.jsonl`.

  Replacing a previous run's shards deletes only `<prefix>-<5 digits>-of-N`,
  never other files that share the prefix (see EXACT_SHARD_GLOB).
  """

  def __init__(self, file_path_prefix: str, num_shards: int = 0):
    super().__init__()
    self._prefix = file_path_prefix
    self._num_shards = num_shards

  def expand(self, records):
    write = beam.io.WriteToText(
      self._prefix,
      file_name_suffix='.jsonl',
      num_shards=self._num_shards,
      shard_name_template='-SSSSS-of-NNNNN',
      coder=JsonLineCoder(),
    )
    write._sink.shard_name_glob_format = EXACT_SHARD_GLOB  # as WriteToText.expand itself sets it when unbounded
    return records | 'WriteText' >> write


class WriteWindowedJsonLines(beam.PTransform):
  """JSON lines for unbounded input: files per `frequency`-second window and pane.

  `fileio.WriteToFiles` names files by window *and pane*
  (`<prefix>-<start>-<end>-<pane>-<shard>-of-<n>.jsonl`), so two firings of
  one window never overwrite each other.
  """

  def __init__(self, prefix: str, frequency: float):
    super().__init__()
    self._prefix, self._frequency = prefix, frequency

  def expand(self, records):
    directory, name = os.path.split(self._prefix)
    return (
      records
      | 'WriteWindows' >> beam.WindowInto(beam.window.FixedWindows(self._frequency))
      | 'ToJson' >> beam.Map(json_line)
      | 'WriteFiles'
      >> fileio.WriteToFiles(directory or '.', file_naming=fileio.default_file_naming(name, '.jsonl'), shards=1)
    )
