"""Reading back the JSON-lines files pipelines write (`transforms.io.WriteJsonLines`)."""
from __future__ import annotations

import glob
import json


def read_jsonl(pattern: str) -> list[dict]:
  """All records of the files matching `pattern`, files in sorted order."""
  records = []
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      records.extend(json.loads(line) for line in f if line.strip())
  return records
