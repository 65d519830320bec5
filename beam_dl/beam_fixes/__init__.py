"""Fixes for Apache Beam bugs that lose data, break pipelines or stall every bundle, applied
when `beam_dl` is imported.

Each fix is a module here, written up for upstream in docs/beam_fixes.md,
with a test that shows the bug on unpatched Beam (so an upgrade that fixes
it upstream makes that test fail, and the fix can be retired):

| fix | what it stops |
|---|---|
| `output_flush` | the SDK harness's time-based output flush losing elements written during it |
| `state_cache_sizing` | the state cache listing every loaded module on each put (~7 ms a write) |
| `state_commit` | a bundle's state writes waiting for the runner one round trip at a time |
| `bundle_end_wait` | every bundle's end waiting out the state sampler's sleep (up to 200 ms) |
| `processing_time_delay` | a sub-second `AfterProcessingTime` delay failing to translate, or firing at once |
| `inference_resource` | RunInference's memory readings (and a warning per reading) without PyTorch |
| `side_input_commit` | the FnApiRunner repeating a side input's elements once per producer bundle |
| `batch_trigger_clock` | a processing-time trigger failing a batch GroupByKey on the FnApiRunner |

Every fix names the Beam versions it was written against
(`BeamFix.beam_versions`) and refuses to apply outside them: on another
Beam it logs one line and leaves Beam as it is. The fixes applied are logged
once per process (`log_active`). `BEAM_DL_BEAM_FIXES=off` turns them all
off; `BEAM_DL_BEAM_FIXES=-output_flush,-state_cache_sizing` turns off the
ones named.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import apache_beam
from packaging.specifiers import SpecifierSet
from packaging.version import Version

_log = logging.getLogger(__name__)

ENV_VAR = 'BEAM_DL_BEAM_FIXES'


@dataclasses.dataclass(frozen=True)
class BeamFix:
  """One runtime fix to Beam: `apply` installs it (True if in place),
  `revert` puts Beam's own code back; `beam_versions` is the range of
  Beam releases it was written and tested against."""

  name: str
  summary: str
  beam_versions: str
  apply: Callable[[], bool]
  revert: Callable[[], None]

  def targets(self, beam_version: str) -> bool:
    return Version(beam_version) in SpecifierSet(self.beam_versions)


def _all_fixes() -> list[BeamFix]:
  from beam_dl.beam_fixes import (
    batch_trigger_clock,
    bundle_end_wait,
    inference_resource,
    output_flush,
    processing_time_delay,
    side_input_commit,
    state_cache_sizing,
    state_commit,
  )

  return [
    output_flush.FIX,
    state_cache_sizing.FIX,
    state_commit.FIX,
    bundle_end_wait.FIX,
    processing_time_delay.FIX,
    inference_resource.FIX,
    side_input_commit.FIX,
    batch_trigger_clock.FIX,
  ]


def disabled_by_env(environ=os.environ) -> set[str] | None:
  """Names turned off by BEAM_DL_BEAM_FIXES (None: every fix is off)."""
  value = environ.get(ENV_VAR, '').strip()
  if value.lower() in ('off', '0', 'false', 'none'):
    return None
  return {part.strip()[1:] for part in value.split(',') if part.strip().startswith('-')}


_ACTIVE: list[str] = []
_SKIPPED: list[str] = []
_logged = False


def apply_all(beam_version: str = apache_beam.__version__, environ=os.environ) -> list[str]:
  """Applies every fix that targets `beam_version` and is not turned off;
  returns the names of those in place."""
  off = disabled_by_env(environ)
  active, skipped = [], []
  for fix in _all_fixes():
    if off is None or fix.name in off:
      skipped.append(f'{fix.name} (turned off by {ENV_VAR})')
    elif not fix.targets(beam_version):
      skipped.append(f'{fix.name} (written for Beam {fix.beam_versions}, this is {beam_version})')
    elif fix.apply():
      active.append(fix.name)
    else:
      skipped.append(f'{fix.name} (Beam code it patches has changed)')
  _ACTIVE[:], _SKIPPED[:] = active, skipped
  return active


def active() -> list[str]:
  """The fixes in place in this process."""
  return list(_ACTIVE)


def log_active(force: bool = False) -> None:
  """Logs the fixes in place, once per process (pipelines call it when the
  job starts; `import beam_dl` calls it when logging already is configured)."""
  global _logged
  if _logged and not force:
    return
  _logged = True
  if _ACTIVE:
    _log.info(
      'beam_dl: Beam %s fixes in place: %s (%s=off turns them off)',
      apache_beam.__version__,
      ', '.join(_ACTIVE),
      ENV_VAR,
    )
  for line in _SKIPPED:
    _log.warning('beam_dl: Beam fix not applied: %s', line)


def revert_all() -> None:
  """Puts Beam's own code back for every fix (tests and benchmarks)."""
  for fix in _all_fixes():
    fix.revert()
  _ACTIVE.clear()
