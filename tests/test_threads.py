"""Many threads, nothing lost: Beam's time-based output flush, the flagship
pipeline on several worker threads, and one model called from many threads.
"""
import concurrent.futures
import glob
import json
import os
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from apache_beam.runners.worker import data_plane

from beam_dl import beam_fixes, checkpoints
from beam_dl.handler import METRICS_NAMESPACE, JaxModelHandler, ServeCounts

STREAM = data_plane.TimeBasedBufferingClosableOutputStream


def write_through_a_timer_flush(stream_methods):
  """Writes numbered elements to a time-flushed output stream until either a
  timer-thread flush is caught in the act (the writer then writes one element
  while that flush is between reading and clearing the buffer) or the writer
  itself has flushed twice. Returns (bytes written, bytes sent).
  """
  sent, writer = [], threading.current_thread()
  in_timer_flush, written_during_flush = threading.Event(), threading.Event()
  writer_flushes = []

  def send(data):
    sent.append(bytes(data))
    if threading.current_thread() is writer:
      writer_flushes.append(len(data))
    elif not written_during_flush.is_set():
      in_timer_flush.set()
      written_during_flush.wait(10)  # hold this flush open until the writer wrote

  saved = {name: STREAM.__dict__[name] for name in stream_methods}
  try:
    for name, method in stream_methods.items():
      setattr(STREAM, name, method)
    stream = STREAM(close_callback=send, flush_callback=send, time_flush_threshold_ms=1)
    written, deadline, i = [], time.monotonic() + 20, 0
    while time.monotonic() < deadline and not written_during_flush.is_set() and len(writer_flushes) < 2:
      element = b'<%06d>' % i
      stream.write(element)
      written.append(element)
      stream.maybe_flush()
      i += 1
      if in_timer_flush.wait(0.001):  # a timer flush is reading the buffer right now
        element = b'<%06d>' % i
        stream.write(element)
        written.append(element)
        written_during_flush.set()
        i += 1
    stream.close()
  finally:
    for name, method in saved.items():
      setattr(STREAM, name, method)
  return b''.join(written), b''.join(sent)


def test_beams_timer_flush_loses_what_is_written_during_it():
  """The Beam bug itself (kept as a test so that a Beam upgrade that fixes or
  changes it is noticed): the timer thread's flush clears bytes it never sent."""
  written, sent = write_through_a_timer_flush(beam_fixes.BEAM_METHODS)
  assert len(sent) < len(written)


def test_fixed_timer_flush_sends_every_byte_in_order():
  assert beam_fixes.apply() and STREAM._beam_dl_fixed
  written, sent = write_through_a_timer_flush(beam_fixes.FIXED_METHODS)
  assert sent == written and len(written) > 0


SPEC = checkpoints.ModelSpec(
    name='small_cnn',
    kwargs={'num_classes': 5, 'features': [4], 'hidden': 8},
    input_shape=(6, 6, 1),
    input_dtype='uint8',
    input_scale=1 / 255,
)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  import jax

  variables = SPEC.build().init(jax.random.key(3), np.zeros((1, 6, 6, 1), np.float32))
  return checkpoints.save(str(tmp_path_factory.mktemp('threads') / 'model'), SPEC, variables, fmt='msgpack')


def test_one_model_served_from_many_threads(model_dir):
  """Sixteen threads share one handler and one LoadedModel with batch sizes
  1..40 (every bucket, chunked batches too): each example gets exactly its
  own output, identical to a one-thread run, and the per-call counts add up
  to the one-thread counts exactly."""
  handler = JaxModelHandler(model_dir, max_batch_size=16)
  model = handler.load_model()
  rng = np.random.default_rng(0)
  batches = [list(rng.integers(0, 256, size=(n, 6, 6, 1), dtype=np.uint8)) for n in [*range(1, 41)] * 4]
  for size in handler._batch_buckets:  # compile every bucket first: compiles are then exactly 0
    model.predict_counted(batches[size - 1])
  reference = [model.predict_counted(batch) for batch in batches]

  def serve(batch):
    results = handler.run_inference(batch, model)
    _, counts = model.predict_counted(batch)
    return results, counts

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    served = list(pool.map(serve, batches))
  for batch, (want, want_counts), (results, counts) in zip(batches, reference, served):
    assert len(results) == len(batch)
    assert all(r.example is x for r, x in zip(results, batch))  # its own output, in order
    np.testing.assert_array_equal(np.stack([r.inference for r in results]), want)
    assert counts == want_counts and counts.compiles == 0
  total = ServeCounts()
  for _, counts in served:
    total.add(counts)
  assert total.total_slots - total.padded_slots == sum(len(b) for b in batches)


def test_handler_load_state_is_exact_across_threads(model_dir, tmp_path):
  """Loads and failed refreshes counted once each while threads infer; a
  failed refresh keeps the good model and never becomes the last good one."""
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / checkpoints.SPEC_FILE).write_text(SPEC.to_json())
  (broken / checkpoints.MSGPACK_FILE).write_bytes(b'\xc1 not msgpack')
  handler = JaxModelHandler(model_dir, max_batch_size=4, batch_buckets=(1, 2, 4))
  good = handler.load_model()
  handler.update_model_path(str(broken))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    loaded = list(pool.map(lambda _: handler.load_model(), range(32)))
  assert all(m is good for m in loaded)
  assert handler._unreported_load_failures == 32 and handler._unreported_loads == 1
  handler._report_loads()
  assert handler._unreported_load_failures == handler._unreported_loads == 0
