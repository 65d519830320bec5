"""Orbax checkpoints of the full training state, every N steps and at the end.

The state (step, params, optimizer state, batch stats) is saved as it lies
on the devices -- sharded arrays stay sharded, every host writes its own
shards -- and restored straight into the sharded layout of the current run.
The served model is exported separately (`beam_dl.models.checkpoints.save`).
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

from beam_dl.models.checkpoints import CheckpointError

_log = logging.getLogger(__name__)


def manager(directory: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager saving at multiples of `every` (plus forced saves)."""
  directory = directory if '://' in directory else os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(save_interval_steps=max(every, 1), max_to_keep=keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def _as_tree(state):
  return {
    'step': state.step,
    'params': state.params,
    'opt_state': state.opt_state,
    'batch_stats': state.batch_stats,
  }


def save(mngr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  """Saves (asynchronously) when `step` is due or `force`; True if it saved."""
  return mngr.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=force)


def _set_aside(mngr: ocp.CheckpointManager, steps) -> None:
  """Renames damaged step directories to `<step>.damaged` (kept for a look,
  no longer a step), so the resumed run can save those steps again."""
  for step in steps:
    path = mngr.directory / str(step)
    if path.exists():
      path.rename(mngr.directory / f'{step}.damaged')
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, target_state):
  """The newest saved state that restores, laid out like `target_state`
  (abstract), or None when nothing was saved.

  A damaged checkpoint (a file cut short by a killed upload, a missing
  array, shapes of another config) is skipped with a warning naming its step
  and why, and the next older one is tried: resuming a little earlier beats
  not resuming. If none restores, CheckpointError names the directory and
  each step with its reason.
  """
  skipped = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      tree = mngr.restore(step, args=ocp.args.StandardRestore(_as_tree(target_state)))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e).strip() else ""}'[:300]
      _log.warning('checkpoint step %d in %s cannot be restored, skipping it: %s', step, mngr.directory, reason)
      skipped.append((step, reason))
      continue
    if skipped:
      _set_aside(mngr, [s for s, _ in skipped])
      _log.warning(
        'resuming from step %d in %s; skipped damaged step(s) %s (kept as <step>.damaged)',
        step,
        mngr.directory,
        [s for s, _ in skipped],
      )
    return target_state.replace(**tree)
  if skipped:
    raise CheckpointError(
      f'{mngr.directory}: no checkpoint can be restored: ' + '; '.join(f'step {s}: {r}' for s, r in skipped)
    )
  return None
