"""Dead-letter records: how an input that could not be processed is reported.

Every input of a beam_dl transform ends in exactly one place: its main output
or the tagged output `FAILED` as a record of this shape, so a pipeline can
write, count and replay what failed instead of crashing or dropping it.
"""
from __future__ import annotations

from typing import Any

FAILED = 'failed'


def dead_letter(key: Any, stage: str, reason: str, **extra: Any) -> dict[str, Any]:
  """{"key", "stage", "reason"} (+ extra fields), JSON-serialisable."""
  record = {'key': None if key is None else str(key), 'stage': stage, 'reason': reason}
  record.update(extra)
  return record


def describe(error: BaseException) -> str:
  """A one-line reason for an exception: its type and message."""
  message = str(error).strip().splitlines()[0] if str(error).strip() else ''
  return f'{type(error).__name__}: {message}' if message else type(error).__name__
