"""Bounded waits for tests: poll a condition until a deadline, never sleep for a guess."""

from __future__ import annotations

import os
import time
from typing import Callable


def wait_for(condition: Callable[[], bool], deadline_s: float = 60.0, interval_s: float = 0.05) -> bool:
  """True as soon as `condition()` holds; False once `deadline_s` has passed without it."""
  deadline = time.monotonic() + deadline_s
  while time.monotonic() < deadline:
    if condition():
      return True
    time.sleep(interval_s)  # poll interval of the bounded wait
  return condition()


def was_read(path: str) -> bool:
  """Whether `path` has been opened for reading since it was last written:
  its access time passes its mtime (relatime updates atime on the first
  read after a write), so a test can see a pipeline has read a file."""
  st = os.stat(path)
  return st.st_atime_ns > st.st_mtime_ns
