"""The SDK worker's state cache weighs each value by listing every loaded
module (Beam 2.77).

Every value put in (or loaded into) an SDK worker's state cache is weighed
with `statecache.get_deep_size`, which calls `objsize.get_deep_size` with
objsize's default `exclude_modules_globals=True`: on each call objsize lists
`vars()` of every module in `sys.modules` (~3,000 with JAX/TF loaded) to
exclude their globals, whatever the size of the value. A stateful DoFn on the
in-process runner (its cache is on, 100 MB) paid ~7 ms per state write for it
(the late-data gate: 78 of 109 s for 10k events). Beam's own filter already
stops the walk at modules, types and functions, the ways to reach module
globals from a value, so the weight stays the same without the per-call
listing.
"""

from __future__ import annotations

import objsize
from apache_beam.runners.worker import statecache

from beam_dl.beam_fixes import BeamFix

BEAM_DEEP_SIZE = statecache.get_deep_size
_HELPERS = ('_size_func', '_get_referents_func', '_filter_func')


def state_cache_deep_size(*objs) -> int:
  """Beam's `statecache.get_deep_size` without objsize's per-call module walk."""
  return objsize.get_deep_size(
    *objs,
    get_size_func=statecache._size_func,  # pylint: disable=protected-access
    get_referents_func=statecache._get_referents_func,  # pylint: disable=protected-access
    filter_func=statecache._filter_func,  # pylint: disable=protected-access
    exclude_modules_globals=False,
  )


def apply() -> bool:
  """Installs `state_cache_deep_size` as the cache's weigher; False (Beam
  untouched) if the statecache no longer has the helpers it reuses."""
  if statecache.get_deep_size is state_cache_deep_size:
    return True
  if not all(hasattr(statecache, name) for name in _HELPERS):
    return False
  statecache.get_deep_size = state_cache_deep_size
  return True


def revert() -> None:
  statecache.get_deep_size = BEAM_DEEP_SIZE


FIX = BeamFix('state_cache_sizing', 'state cache lists every loaded module per put', '>=2.77,<2.78', apply, revert)
