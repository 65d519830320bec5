"""Many threads, nothing lost: Beam's time-based output flush, the flagship
pipeline on several worker threads, and one model called from many threads.
"""

import concurrent.futures
import glob
import json
import os
import resource
import sys
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from apache_beam.runners.worker import data_plane

from beam_dl.beam_fixes import output_flush
from beam_dl.models import checkpoints
from beam_dl.serving.handler import JaxModelHandler, ServeCounts
from tests.models import save_broken_model, save_seeded_model

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
  written, sent = write_through_a_timer_flush(output_flush.BEAM_METHODS)
  assert len(sent) < len(written)


def test_fixed_timer_flush_sends_every_byte_in_order():
  assert output_flush.apply() and STREAM._beam_dl_fixed
  written, sent = write_through_a_timer_flush(output_flush.FIXED_METHODS)
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
  return save_seeded_model(tmp_path_factory.mktemp('threads') / 'model', SPEC, seed=3, fmt='msgpack')[0]


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
  broken = save_broken_model(tmp_path / 'broken', SPEC, b'\xc1 not msgpack')
  handler = JaxModelHandler(model_dir, max_batch_size=4, batch_buckets=(1, 2, 4))
  good = handler.load_model()
  handler.update_model_path(str(broken))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    loaded = list(pool.map(lambda _: handler.load_model(), range(32)))
  assert all(m is good for m in loaded)
  assert handler._unreported_load_failures == 32 and handler._unreported_loads == 1
  handler._report_loads()
  assert handler._unreported_load_failures == handler._unreported_loads == 0


class _Model:
  """What SlowHandler 'loads' (weak-referenceable, as Beam's Shared needs)."""


class SlowHandler(ModelHandler):
  """A stateless model that takes ~1 ms per image, releasing the GIL as real
  compute does: logits are the image's pixel histogram over 10 bins."""

  def load_model(self):
    return _Model()

  def run_inference(self, batch, model, inference_args=None):
    time.sleep(0.001 * len(batch))  # stands in for device compute, not a wait
    return [PredictionResult(x, np.histogram(x, bins=10, range=(0, 256))[0].astype(np.float32)) for x in batch]


def classify_folders(tmp_path, model_dir, name, beam_args):
  """Runs the flagship pipeline (classify_images.build) with SlowHandler;
  returns ({key: prediction record}, [dead letters])."""
  from apache_beam.options.pipeline_options import PipelineOptions

  from pipelines import classify_images
  from transforms import inference

  out = str(tmp_path / name / 'pred')
  options = PipelineOptions(
    [f'--input={tmp_path}/images/*/*.png', f'--model_dir={model_dir}', f'--output={out}', *beam_args]
  )
  real = inference.JaxModelHandler
  inference.JaxModelHandler = lambda *args, **kwargs: SlowHandler()
  try:
    with beam.Pipeline(options=options) as pipeline:
      classify_images.build(pipeline, options)
  finally:
    inference.JaxModelHandler = real
  records = {}
  for path in glob.glob(out + '-[0-9]*.jsonl'):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        assert record['key'] not in records, f'{record["key"]} predicted twice'
        records[record['key']] = record
  failed = []
  for path in glob.glob(out + '_failed-*.jsonl'):
    with open(path) as f:
      failed += [json.loads(line) for line in f]
  return records, failed


def _data_bytes() -> int:
  """This process's data segment + private mappings now (what RLIMIT_DATA limits)."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmData:'))


@pytest.mark.slow
def test_flagship_pipeline_on_many_threads_matches_one_thread(tmp_path, monkeypatch):
  """classify_images over 2,400 images in 12 folders, four worker threads
  (multi_threading) against one: every key once, with the same record, no
  dead letter. The embedded SDK harness flushes outputs from a timer thread
  every 1 s; here every 1 ms, and threads switch every 10 us, so that a race
  between that flush and the bundle's own writes (it lost, tore and garbled
  elements before beam_dl's fix) shows up in every run rather than now and
  then."""
  from apache_beam.runners.portability.fn_api_runner import worker_handlers
  from PIL import Image

  rng = np.random.default_rng(0)
  for folder in range(12):
    os.makedirs(tmp_path / 'images' / f'f{folder:02d}')
    for i in range(200):
      Image.fromarray(rng.integers(0, 256, (6, 6), np.uint8)).save(
        tmp_path / 'images' / f'f{folder:02d}' / f'{i:03d}.png'
      )
  # A real model directory: the pipeline checks the model loads before the job starts (the stand-in
  # handler then serves it; ClassifyImages reads the input size from its spec.json).
  spec_dir = save_seeded_model(tmp_path / 'model', SPEC, fmt='msgpack')[0]

  one, one_failed = classify_folders(tmp_path, str(spec_dir), 'one', ['--direct_num_workers=1'])
  assert len(one) == 2400 and one_failed == []
  monkeypatch.setattr(worker_handlers, 'DATA_BUFFER_TIME_LIMIT_MS', 1)
  switch_interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-5)  # threads take turns 500x as often: interleavings a busy worker sees
  data_limit = resource.getrlimit(resource.RLIMIT_DATA)
  # Torn elements decode as garbage lengths (tens of GB): fail with MemoryError, not the OOM killer.
  resource.setrlimit(resource.RLIMIT_DATA, (_data_bytes() + (4 << 30), data_limit[1]))
  try:
    many, many_failed = classify_folders(
      tmp_path, str(spec_dir), 'many', ['--direct_num_workers=4', '--direct_running_mode=multi_threading']
    )
  finally:
    resource.setrlimit(resource.RLIMIT_DATA, data_limit)
    sys.setswitchinterval(switch_interval)
  assert many_failed == []
  assert sorted(set(one) - set(many)) == [] and sorted(set(many) - set(one)) == []
  assert many == one


def test_importing_beam_dl_applies_the_fix():
  """A fresh process that only imports a beam_dl transform (as an SDK worker
  unpickling its DoFns does) runs with the fixed stream."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (
    'import transforms.io; from apache_beam.runners.worker import data_plane; '
    'print(getattr(data_plane.TimeBasedBufferingClosableOutputStream, "_beam_dl_fixed", False))'
  )
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([root, os.environ.get('PYTHONPATH', '')])}
  done = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert done.stdout.strip() == 'True', done.stderr
