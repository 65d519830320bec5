"""Writers for pipeline outputs."""
from __future__ import annotations

import json

import apache_beam as beam

import beam_dl  # noqa: F401  (its import fixes Beam's time-based flush: beam_dl/beam_fixes.py)


class WriteJsonLines(beam.PTransform):
  """Writes dicts as JSON lines to `<prefix>-SSSSS-of-NNNNN.jsonl`."""

  def __init__(self, file_path_prefix: str, num_shards: int = 0):
    super().__init__()
    self._prefix = file_path_prefix
    self._num_shards = num_shards

  def expand(self, records):
    return (
        records
        | 'ToJson' >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
        | 'WriteText'
        >> beam.io.WriteToText(
            self._prefix,
            file_name_suffix='.jsonl',
            num_shards=self._num_shards,
            shard_name_template='-SSSSS-of-NNNNN',
        )
    )
