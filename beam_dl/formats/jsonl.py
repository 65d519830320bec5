"""The JSON-lines files pipelines write (`transforms.io.WriteJsonLines`):
one record a line, keys sorted; and reading them back."""

from __future__ import annotations

import glob
import json

from apache_beam import coders


def json_line(record) -> str:
  """`record` as one JSON line (keys sorted), without the newline."""
  return json.dumps(record, sort_keys=True)


class JsonLineCoder(coders.Coder):
  """A record <-> its JSON line (UTF-8, keys sorted), without the newline.

  Given to `WriteToText` as its coder, the sink encodes each record as it
  writes it: no Beam step of its own per record to make the string first.
  """

  def encode(self, value) -> bytes:
    return json_line(value).encode('utf-8')

  def decode(self, encoded: bytes):
    return json.loads(encoded)

  def is_deterministic(self) -> bool:
    return True  # sorted keys: equal records, equal bytes


def read_jsonl(pattern: str) -> list[dict]:
  """All records of the files matching `pattern`, files in sorted order."""
  records = []
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      records.extend(json.loads(line) for line in f if line.strip())
  return records
