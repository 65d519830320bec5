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


class Lookahead:
  """`submit(arg, context, cost)` queues fn(arg) on `threads` threads and
  returns the (context, outcome) pairs that are more than `depth` submissions
  old, or beyond `max_cost` summed over what is pending (e.g. input bytes:
  a few huge photos must not pile up), in submission order; `drain()`
  returns the rest. An outcome is the result, or the exception fn raised
  (returned, not raised, so the caller decides).

  depth=0 runs fn inline: no threads, each submit returns its own pair.
  """

  def __init__(self, fn: Callable[[Any], Any], depth: int, threads: int = 1,
               max_cost: float = float('inf')):
    if depth < 0 or threads < 1:
      raise ValueError(f'depth must be >= 0 and threads >= 1, got depth={depth}, threads={threads}')
    self._fn, self._depth, self._max_cost = fn, depth, max_cost
    self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix='lookahead') if depth else None
    self._pending: collections.deque = collections.deque()
    self._cost = 0.0

  def submit(self, arg: Any, context: Any = None, cost: float = 0.0) -> Iterator[tuple[Any, Any]]:
    if self._pool is None:
      yield context, self._call(arg)
      return
    self._pending.append((context, cost, self._pool.submit(self._call, arg)))
    self._cost += cost
    while len(self._pending) > self._depth or (self._cost > self._max_cost and len(self._pending) > 1):
      yield self._pop()

  def drain(self) -> Iterator[tuple[Any, Any]]:
    while self._pending:
      yield self._pop()

  def _pop(self) -> tuple[Any, Any]:
    context, cost, future = self._pending.popleft()
    self._cost -= cost
    return context, future.result()

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def _call(self, arg):
    try:
      return self._fn(arg)
    except Exception as e:  # handed back to the caller in order
      return e
