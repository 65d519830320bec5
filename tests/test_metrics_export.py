"""Prometheus export of Beam metrics, scraped over 127.0.0.1 from real pipeline runs.

The Grafana dashboard shipped in docs/grafana is checked against the names
the exporter really emits.
"""

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from beam_dl.formats.jsonl import read_jsonl
from beam_dl.operations import drift
from beam_dl.operations.metrics_export import family_name, labelled, parse_labelled
from beam_dl.services.process import free_port, service_process
from tests.services import http_ok
from transforms.metrics import reason_kind

DASHBOARD = os.path.join(os.path.dirname(__file__), '..', 'docs', 'grafana', 'beam_dl.json')
N_IMAGES = 120


def test_labelled_names_round_trip_and_families_are_valid():
  name = labelled('dead_letters', stage='decode', reason='Image{Decode}=Error,x')
  assert parse_labelled(name) == ('dead_letters', {'reason': 'Image_Decode__Error_x', 'stage': 'decode'})
  assert parse_labelled('decoded') == ('decoded', {})
  assert family_name('beam_dl.images', 'decoded') == 'beam_dl_images_decoded'
  assert family_name('BeamDL_Jax', 'inference-batch latency') == 'beamdl_jax_inference_batch_latency'
  assert family_name('9lives', 'x') == '_9lives_x'
  assert reason_kind('ImageDecodeError: corrupt or truncated image: ...') == 'ImageDecodeError'
  assert reason_kind('not a recognised image format') == 'not_a_recognised_image'
  assert reason_kind('window [0, 60) has 1 event(s); scoring needs at least 2') == 'window'
  assert reason_kind('[1, 2] is bad') == reason_kind(None) == 'other'


def _scrape(port: int) -> str:
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as response:
    return response.read().decode('utf-8')


def _run(fn, argv, errors):
  try:
    fn(argv)
  except Exception as e:  # reported to the test thread
    errors.append(e)


def _run_and_scrape_final(run, argv, port: int, timeout_s: float = 600):
  """Runs `run(argv)` on a thread and polls its endpoint (bounded) until it
  serves the job's final values (state DONE); returns (that text or None,
  the job's exceptions, the thread, joined: the job lingers until scraped once)."""
  errors = []
  job = threading.Thread(target=lambda: _run(run, argv, errors), daemon=True)
  job.start()
  text, deadline = None, time.monotonic() + timeout_s
  while job.is_alive() and time.monotonic() < deadline:
    try:
      body = _scrape(port)
    except (urllib.error.URLError, ConnectionError):
      job.join(0.2)
      continue
    if 'state="DONE"' in body:
      text = body
      break
    job.join(0.2)
  job.join(60)
  return text, errors, job


def _samples(text: str) -> dict:
  """{sample name: [(labels, value)]} of a Prometheus text exposition."""
  out = {}
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      out.setdefault(sample.name, []).append((sample.labels, sample.value))
  return out


def _dashboard_metric_names() -> set:
  with open(DASHBOARD, encoding='utf-8') as f:
    dashboard = json.load(f)
  exprs = [t['expr'] for panel in dashboard['panels'] for t in panel['targets']]
  assert exprs and all(p['datasource']['type'] == 'prometheus' for p in dashboard['panels'])
  words = set(re.findall(r'[a-zA-Z_:][a-zA-Z0-9_:]*', ' '.join(exprs)))
  promql = {'sum', 'by', 'rate', 'max', 'increase', 'pipeline', 'feature', 'stage', 'reason', 'm', 'h'}
  return {w for w in words - promql if w.startswith('beam')}


def _write_inputs(directory, images):
  from PIL import Image

  os.makedirs(directory, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(directory, f'{i:04d}.png'))
  with open(os.path.join(directory, 'not_an_image.png'), 'w') as f:
    f.write('plain text')
  with open(os.path.join(directory, '0000.png'), 'rb') as f:
    head = f.read(40)
  with open(os.path.join(directory, 'truncated.png'), 'wb') as f:
    f.write(head)
  return os.path.join(directory, '*.png')


@pytest.mark.slow
def test_classify_images_serves_beam_metrics_to_prometheus(digits_model_dir, tmp_path):
  from pipelines import classify_images, demo

  x_train, x_test, _, _ = demo.digit_images()
  pixels = x_train.astype(np.float32) / 255.0
  profile = drift.save_profile(
    drift.build_profile({'image/brightness': pixels.mean(axis=(1, 2)), 'image/contrast': pixels.std(axis=(1, 2))}),
    str(tmp_path / 'drift_profile.json'),
  )
  out = str(tmp_path / 'out' / 'pred')
  port = free_port()
  argv = [
    '--input',
    _write_inputs(tmp_path / 'in', x_test[:N_IMAGES]),
    '--output',
    out,
    '--model_dir',
    digits_model_dir,
    '--runner',
    'FnApiRunner',
    '--drift_profile',
    profile,
    '--metrics_port',
    str(port),
    '--metrics_poll_secs',
    '0.5',
    '--metrics_linger_secs',
    '600',
  ]
  text, errors, job = _run_and_scrape_final(classify_images.run, argv, port)
  assert not errors and not job.is_alive() and text, (errors, text)
  with pytest.raises((urllib.error.URLError, ConnectionError)):
    _scrape(port)  # the endpoint closes with the run

  samples = _samples(text)
  decoded = sum(v for _, v in samples['beam_dl_images_decoded_total'])
  assert decoded == N_IMAGES
  dead = {(l['stage'], l['reason']): v for l, v in samples['beam_dl_deadletters_dead_letters_total']}
  assert dead == {('decode', 'not_a_recognised_image'): 2.0}
  assert len(read_jsonl(f'{out}_failed-*.jsonl')) == 2
  batches = sum(v for _, v in samples['beamdl_jax_inference_batch_latency_micro_secs_count'])
  assert batches >= 1 and sum(v for _, v in samples['beamdl_jax_inference_batch_latency_micro_secs_sum']) > 0
  (report,) = read_jsonl(f'{out}_drift-0*.jsonl')
  psi = {l['feature']: v for l, v in samples['beam_dl_drift_psi']}
  assert psi == pytest.approx({name: f['psi'] for name, f in report['features'].items()}, abs=1e-6)
  assert set(psi) == {'image/brightness', 'image/contrast'}
  assert all(l['pipeline'] == 'classify_images' for l, _ in samples['beam_dl_drift_js'])

  # Every metric the dashboard charts is one the exporter emits (score_sequences' ones below).
  emitted = set(samples) | {f.name for f in text_string_to_metric_families(text)}
  sequences_only = {
    'beam_dl_score_sequences_scored_total',
    'beam_dl_score_sequences_latency_p50_ms',
    'beam_dl_score_sequences_latency_p99_ms',
    'beam_dl_score_sequences_latency_ms_max',
    'beam_dl_drift_alerts_total',
  }
  assert _dashboard_metric_names() - emitted == sequences_only


@pytest.mark.slow
def test_score_sequences_serves_latency_drift_and_alerts(tmp_path):
  """The streaming-side metrics of the dashboard, from a batch score_sequences run on CO2."""
  from pipelines import score_sequences
  from pipelines import score_sequences_demo as demo

  times, values = demo.load_series()
  n = 600
  model = str(tmp_path / 'model')
  demo.train_model(model, values[:n], steps=20, cell='gru', pooling='last')
  profile = drift.save_profile(
    drift.build_profile({'co2': values[:n][np.isfinite(values[:n])]}), str(tmp_path / 'drift_profile.json')
  )
  events = tmp_path / 'events.jsonl'
  with open(events, 'w') as f:  # the next 300 weeks: CO2 has risen past the reference range
    for t, v in zip(times[n : n + 300], values[n : n + 300]):
      f.write(json.dumps({'key': 'mauna_loa', 'time': float(t), 'co2': None if np.isnan(v) else float(v)}) + '\n')
  out = str(tmp_path / 'scores')
  port = free_port()
  argv = [
    '--input',
    str(events),
    '--output',
    out,
    '--model_dir',
    model,
    '--event_value_fields',
    'co2',
    '--window',
    'sliding',
    '--window_size',
    str(12 * demo.WEEK),
    '--window_period',
    str(demo.WEEK),
    '--seq_len',
    '12',
    '--forecast',
    '--min_length',
    '8',
    '--runner',
    'FnApiRunner',
    '--drift_profile',
    profile,
    '--metrics_port',
    str(port),
    '--metrics_linger_secs',
    '600',
  ]
  text, errors, _ = _run_and_scrape_final(score_sequences.run, argv, port)
  assert not errors and text, errors
  samples = _samples(text)
  assert sum(v for _, v in samples['beam_dl_score_sequences_scored_total']) == len(read_jsonl(f'{out}-0*.jsonl'))
  assert {l['feature'] for l, _ in samples['beam_dl_drift_alerts_total']} == {'co2'}
  assert samples['beam_dl_score_sequences_latency_ms_max']
  emitted = set(samples) | {f.name for f in text_string_to_metric_families(text)}
  missing = _dashboard_metric_names() - emitted
  assert missing <= {'beam_dl_images_decoded_total'}, missing


PUSHGATEWAY = os.environ.get('BEAM_DL_PUSHGATEWAY', os.path.expanduser('~/.cache/beam_dl/bin/pushgateway'))


@pytest.fixture
def pushgateway(tmp_path):
  """A real Prometheus Pushgateway on 127.0.0.1 (`make pushgateway` builds it)."""
  if not os.path.exists(PUSHGATEWAY):
    pytest.skip(f'no Pushgateway at {PUSHGATEWAY}: run `make pushgateway` (or set BEAM_DL_PUSHGATEWAY)')
  address = f'127.0.0.1:{free_port()}'
  with service_process(
    [PUSHGATEWAY, f'--web.listen-address={address}'],
    log_path=str(tmp_path / 'pushgateway.log'),
    ready=lambda: http_ok(f'http://{address}/-/ready'),
    timeout_s=60,
  ):
    yield address


@pytest.mark.slow
def test_classify_images_pushes_final_metrics_to_a_pushgateway(pushgateway, digits_model_dir, tmp_path):
  from pipelines import classify_images, demo

  _, x_test, _, _ = demo.digit_images()
  classify_images.run(
    [
      '--input',
      _write_inputs(tmp_path / 'in', x_test[:20]),
      '--output',
      str(tmp_path / 'pred'),
      '--model_dir',
      digits_model_dir,
      '--runner',
      'FnApiRunner',
      '--metrics_pushgateway',
      pushgateway,
      '--metrics_job',
      'digits_test',
    ]
  )
  with urllib.request.urlopen(f'http://{pushgateway}/metrics', timeout=10) as response:
    samples = _samples(response.read().decode('utf-8'))
  decoded = [(l, v) for l, v in samples['beam_dl_images_decoded_total'] if l.get('job') == 'digits_test']
  assert sum(v for _, v in decoded) == 20
  dead = {(l['stage'], l['reason']): v for l, v in samples['beam_dl_deadletters_dead_letters_total']}
  assert dead == {('decode', 'not_a_recognised_image'): 2.0}


def test_direct_runner_runs_in_process_even_where_prism_is_available():
  """Beam's DirectRunner would run this pipeline on Prism given the binary (it
  downloads it where it has network); beam_dl's run_pipeline keeps it on the
  in-process FnApiRunner that the project tests."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.runners.portability.fn_api_runner import fn_runner

  from beam_dl.operations.metrics_export import run_pipeline
  from tests.runner_matrix import prism_binary

  if not prism_binary():
    pytest.skip('needs the prism binary to show the difference: make runners')
  options = PipelineOptions([f'--prism_location={prism_binary()}'])
  pipeline = beam.Pipeline(options=options)
  _ = pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: x + 1)
  result = run_pipeline(pipeline, options)
  assert isinstance(result, fn_runner.RunnerResult), type(result)
