"""Run a pure function ahead of the caller on a thread pool, results in order.

Why: in a fused Beam stage every element goes depth-first through decode ->
BatchElements -> the model -> formatting -> the writer, one thread. While the
model's forward pass runs (XLA on its own threads, GIL released) nothing
decodes the next batch, so decode and compute add up; a hand-written loop
overlaps them. A DoFn that submits each element's decode to a pool and emits
results `depth` elements later lets the pool decode batch k+1 (Pillow also
releases the GIL) while the stage thread waits on batch k's forward pass.

Only the pure function runs on the pool: the DoFn keeps metrics, dead letters
and outputs on the bundle's thread (Beam's metrics containers are
thread-local; updates from other threads would be dropped).
"""

from __future__ import annotations

import collections
from concurrent import futures
from typing import Any, Callable, Iterator


class _Group:
  """Arguments handed to the pool as one task, and that task's future."""

  __slots__ = ('args', 'future')

  def __init__(self):
    self.args: list = []
    self.future: futures.Future | None = None


class Lookahead:
  """`submit(arg, context, cost)` queues fn(arg) on `threads` threads and
  returns the (context, outcome) pairs that are more than `depth` submissions
  old, or beyond `max_cost` summed over what is pending (e.g. input bytes:
  a few huge photos must not pile up), in submission order; `drain()`
  returns the rest. An outcome is the result, or the exception fn raised
  (returned, not raised, so the caller decides).

  `group` > 1 hands arguments to the pool `group` at a time (sooner when an
  outcome is due): one pool task costs ~10 us of the caller's thread, as
  much as a small image's Beam step, so per-element tasks would take back
  part of what running ahead saves.

  depth=0 runs fn inline: no threads, each submit returns its own pair.
  """

  def __init__(
    self, fn: Callable[[Any], Any], depth: int, threads: int = 1, max_cost: float = float('inf'), group: int = 1
  ):
    if depth < 0 or threads < 1 or group < 1:
      raise ValueError(
        f'depth must be >= 0, threads and group >= 1, got depth={depth}, threads={threads}, group={group}'
      )
    self._fn, self._depth, self._max_cost, self._group = fn, depth, max_cost, group
    self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix='lookahead') if depth else None
    self._pending: collections.deque = collections.deque()
    self._open: _Group | None = None
    self._cost = 0.0

  def submit(self, arg: Any, context: Any = None, cost: float = 0.0) -> Iterator[tuple[Any, Any]]:
    if self._pool is None:
      yield context, self._call(arg)
      return
    if self._open is None:
      self._open = _Group()
    group = self._open
    group.args.append(arg)
    self._pending.append((context, cost, group, len(group.args) - 1))
    self._cost += cost
    if len(group.args) >= self._group:
      self._flush()
    while len(self._pending) > self._depth or (self._cost > self._max_cost and len(self._pending) > 1):
      yield self._pop()

  def drain(self) -> Iterator[tuple[Any, Any]]:
    self._flush()
    while self._pending:
      yield self._pop()

  def _flush(self):
    """Hands the open group to the pool."""
    group, self._open = self._open, None
    if group is not None:
      group.future = self._pool.submit(self._call_all, group.args)
      group.args = None  # the task holds them until it runs

  def _pop(self) -> tuple[Any, Any]:
    context, cost, group, index = self._pending.popleft()
    if group.future is None:
      self._flush()
    self._cost -= cost
    return context, group.future.result()[index]

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def _call_all(self, args: list) -> list:
    return [self._call(arg) for arg in args]

  def _call(self, arg):
    try:
      return self._fn(arg)
    except Exception as e:  # handed back to the caller in order
      return e
