"""The FnApiRunner repeats a side input's elements once per bundle of the
stage that produces it (Beam 2.77).

After every bundle of a stage, `FnApiRunnerExecutionContext.
commit_side_inputs_to_state` appends the stage's whole output buffer for each
side input it feeds to the side input's state (`append_raw`). The buffer
keeps every element the stage produced so far, so a producer that runs in
several bundles (a splittable DoFn that defers, such as PeriodicImpulse or
a file watch, or a stage fed by several upstream bundles) commits its first
elements again after each later bundle. A singleton side input then fails
with "PCollection of size 2 with more than one element accessed as a
singleton view", and list, dict and multimap views hold duplicates. The
DirectRunner runs batch pipelines on the FnApiRunner, so this is what a
pipeline that follows a model alias (`WatchModelAlias`) or a file pattern
(`WatchFilePattern`) meets there.

The fix makes each commit replace the side input's state instead of
appending to it: the first write to a state key in a commit clears it, and
the buffer (every element once) is written after.
"""

from __future__ import annotations

import threading

from apache_beam.runners.portability.fn_api_runner import execution

from beam_dl.beam_fixes import BeamFix

CONTEXT = execution.FnApiRunnerExecutionContext
BEAM_COMMIT = CONTEXT.__dict__['commit_side_inputs_to_state']


class _Replacing:
  """The state servicer, seen by one commit on one thread: the first append
  to each state key clears what an earlier commit wrote there."""

  def __init__(self, servicer):
    self._servicer, self._cleared = servicer, set()

  def append_raw(self, state_key, data):
    key = state_key.SerializeToString(deterministic=True)
    if key not in self._cleared:
      self._cleared.add(key)
      self._servicer.clear(state_key)
    return self._servicer.append_raw(state_key, data)

  def __getattr__(self, name):
    return getattr(self._servicer, name)


_commit_lock = threading.Lock()


def _commit_side_inputs_to_state(self, data_side_input) -> None:
  # Beam's commit reaches the servicer through `self.state_servicer`, a property
  # reading `worker_handler_manager.state_servicer`; the workers hold their own
  # reference, so only this commit sees the replacing view.
  manager = self.worker_handler_manager
  with _commit_lock:
    servicer = manager.state_servicer
    manager.state_servicer = _Replacing(servicer)
    try:
      BEAM_COMMIT(self, data_side_input)
    finally:
      manager.state_servicer = servicer


def apply() -> bool:
  if CONTEXT.__dict__.get('_beam_dl_fixed'):
    return True
  CONTEXT.commit_side_inputs_to_state = _commit_side_inputs_to_state
  CONTEXT._beam_dl_fixed = True
  return True


def revert() -> None:
  CONTEXT.commit_side_inputs_to_state = BEAM_COMMIT
  CONTEXT._beam_dl_fixed = False


FIX = BeamFix(
  'side_input_commit', 'FnApiRunner repeats side-input elements per producer bundle', '>=2.77,<2.78', apply, revert
)
