"""Orbax checkpoints of the full training state, every N steps and at the end.

The state (step, params, optimizer state, batch stats) is saved as it lies
on the devices -- sharded arrays stay sharded, every host writes its own
shards -- and restored straight into the sharded layout of the current run.
The served model is exported separately (`beam_dl.checkpoints.save`).
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


def manager(directory: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager saving at multiples of `every` (plus forced saves)."""
  directory = directory if '://' in directory else os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(every, 1), max_to_keep=keep, create=True
  )
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


def restore_latest(mngr: ocp.CheckpointManager, target_state):
  """The latest saved state laid out like `target_state` (abstract), or None."""
  step = mngr.latest_step()
  if step is None:
    return None
  tree = mngr.restore(step, args=ocp.args.StandardRestore(_as_tree(target_state)))
  return target_state.replace(**tree)
