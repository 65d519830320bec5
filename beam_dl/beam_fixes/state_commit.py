"""A bundle's user state is committed one state cell at a time, each a round trip to the runner (Beam 2.77).

When a bundle ends, `FnApiUserStateContext.commit` commits each state cell
the bundle touched in turn, and each cell's commit
(`SynchronousBagRuntimeState`, which ReadModifyWrite and CombiningValue
state are built on) waits for the runner's answer to its write before the
next cell's write is sent: one round trip per key and cell, in series, while
the runner's task waits for the bundle. The late-data gate
(`beam_dl.features.late`) writes a key's cell when the key's first event of
a new window arrives, so just after each window boundary most of a bundle's
keys write; a stateful DoFn whose state changes with each event writes for
every key of every bundle.

The fix sends every cell's writes (clear, then append, as Beam does), then
waits for all of them: one round trip per bundle. The writes go on the same
ordered state stream as before and the bundle still ends only once the
runner has acknowledged each one, so what is committed, and when the bundle
ends relative to it, is unchanged. Cells of other kinds (set, multimap,
ordered list) commit as Beam commits them.
"""

from __future__ import annotations

from typing import Any

from apache_beam.runners.worker import bundle_processor

from beam_dl.beam_fixes import BeamFix

BEAM_COMMIT = bundle_processor.FnApiUserStateContext.commit


def _bag_under(state: Any):
  """The `SynchronousBagRuntimeState` a state cell writes through, or None (a kind not built on one)."""
  while not isinstance(state, bundle_processor.SynchronousBagRuntimeState):
    state = getattr(state, '_underlying_bag_state', None)
    if state is None:
      return None
  return state


def commit_then_wait_once(self) -> None:
  """`FnApiUserStateContext.commit`, with every bag-backed cell's writes in flight at once."""
  pending = []
  for state in self._all_states.values():  # pylint: disable=protected-access
    bag = _bag_under(state)
    if bag is None:
      state.commit()
      continue
    # pylint: disable=protected-access
    if bag._cleared:
      pending.append(bag._state_handler.clear(bag._state_key))
    if bag._added_elements:
      pending.append(bag._state_handler.extend(bag._state_key, bag._value_coder.get_impl(), bag._added_elements))
  for future in pending:
    future.get()


def apply() -> bool:
  """Installs `commit_then_wait_once`; False (Beam untouched) if the bag state no longer keeps what it reads."""
  context = bundle_processor.FnApiUserStateContext
  if context.commit is commit_then_wait_once:
    return True
  probe = bundle_processor.SynchronousBagRuntimeState(None, None, None)
  if not all(hasattr(probe, name) for name in ('_cleared', '_added_elements', '_state_handler', '_state_key')):
    return False
  context.commit = commit_then_wait_once
  return True


def revert() -> None:
  bundle_processor.FnApiUserStateContext.commit = BEAM_COMMIT


FIX = BeamFix(
  'state_commit', "a bundle's state writes wait for the runner one at a time", '>=2.77,<2.78', apply, revert
)
