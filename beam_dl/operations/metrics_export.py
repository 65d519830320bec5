"""A pipeline's Beam metrics in Prometheus text format (prometheus-client).

    result = metrics_export.run_pipeline(pipeline, options)   # instead of run + wait

With `--metrics_port P` the run serves `http://<address>:P/metrics` while the
job runs: a background thread reads `PipelineResult.metrics()` every
`--metrics_poll_secs` (live values on runners whose `run()` returns while the
job runs: Dataflow, Flink and Spark job servers, the BundleBasedDirectRunner),
and the final values are set when the job ends. Locally the DirectRunner
hands batch jobs, and streaming ones over files, to the FnApiRunner, which
runs the whole job inside `run()` and reports metrics only at the end (so
does Beam's local job service): there the endpoint shows the final values. `--metrics_linger_secs`
keeps serving after the end until one scrape has read the final values.
With `--metrics_pushgateway host:port` the final values are pushed to a
Prometheus Pushgateway, the usual way to collect batch jobs.

Beam metric -> Prometheus family, `<namespace>_<name>` made a valid name:
a counter is a counter (`..._total`); a distribution is a summary
(`_count`, `_sum`) plus `_min` and `_max` gauges; a gauge is a gauge, and a
gauge named `..._e6` holds millionths (Beam gauges are integers) and is
exported divided by 1e6 without the suffix. Every sample has a `step`
label, plus the labels a metric name carries: `labelled('psi_e6',
feature='co2')` is the Beam name `psi_e6{feature=co2}`, exported as
`beam_dl_drift_psi{feature="co2", step="..."}`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

_log = logging.getLogger(__name__)
SCALED_SUFFIX = '_e6'
_LABELLED = re.compile(r'^(?P<base>[^{}]+)\{(?P<labels>[^{}]*)\}$')
_INVALID = re.compile(r'[^a-zA-Z0-9_]')
_LABEL_VALUE_INVALID = re.compile(r'[{}=,]')


def labelled(name: str, **labels: Any) -> str:
  """A Beam metric name carrying Prometheus labels: `name{k=v,...}` (sorted)."""
  if not labels:
    return name
  parts = ','.join(f'{k}={_LABEL_VALUE_INVALID.sub("_", str(v))}' for k, v in sorted(labels.items()))
  return f'{name}{{{parts}}}'


def parse_labelled(name: str) -> tuple[str, dict[str, str]]:
  """`name{k=v,...}` -> (name, {k: v}); a plain name -> (name, {})."""
  match = _LABELLED.match(name)
  if not match:
    return name, {}
  labels = dict(part.split('=', 1) for part in match['labels'].split(',') if '=' in part)
  return match['base'], {_sanitize(k): v for k, v in labels.items()}


def family_name(namespace: str, name: str) -> str:
  """A valid Prometheus metric name from a Beam namespace and base name."""
  text = _sanitize(f'{namespace}_{name}'.lower())
  text = re.sub(r'_+', '_', text).strip('_')
  return text if not text[:1].isdigit() else f'_{text}'


def _sanitize(text: str) -> str:
  return _INVALID.sub('_', text)


def query(result) -> dict:
  """All of a PipelineResult's metrics (Beam's MetricResults query)."""
  # Beam 2.77's FnApiRunner merges per-bundle metrics recursively (one frame
  # per bundle): a long run of many small bundles needs more stack.
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(limit, 100_000))
  try:
    return result.metrics().query()
  finally:
    sys.setrecursionlimit(limit)


def _value(metric_result):
  """The committed value if the runner commits, else the attempted one."""
  try:
    committed = metric_result.committed
  except Exception:  # some runners don't support committed metrics
    committed = None
  return committed if committed is not None else metric_result.attempted


def families(metrics: dict, extra_labels: dict[str, str] | None = None) -> list:
  """Beam query results ({'counters', 'distributions', 'gauges'}) -> metric families."""
  extra = dict(extra_labels or {})
  samples: dict[tuple[str, str], dict[tuple, float]] = {}
  label_names: dict[tuple[str, str], set] = {}

  def put(kind, family, labels, value):
    key = (kind, family)
    label_names.setdefault(key, set()).update(labels)
    bucket = samples.setdefault(key, {})
    frozen = tuple(sorted(labels.items()))
    bucket[frozen] = bucket.get(frozen, 0.0) + value

  for kind, results in (
    ('counter', metrics.get('counters', ())),
    ('distribution', metrics.get('distributions', ())),
    ('gauge', metrics.get('gauges', ())),
  ):
    for res in results:
      value = _value(res)
      if value is None:
        continue
      base, labels = parse_labelled(res.key.metric.name)
      labels = {**extra, **labels, 'step': res.key.step or ''}
      if kind == 'counter':
        put('counter', family_name(res.key.metric.namespace, base), labels, float(value))
      elif kind == 'gauge':
        scale = 1e-6 if base.endswith(SCALED_SUFFIX) else 1.0
        base = base[: -len(SCALED_SUFFIX)] if scale != 1.0 else base
        put('gauge', family_name(res.key.metric.namespace, base), labels, float(value.value) * scale)
      elif value.count:
        family = family_name(res.key.metric.namespace, base)
        put('summary_count', family, labels, float(value.count))
        put('summary_sum', family, labels, float(value.sum))
        put('gauge_min', f'{family}_min', labels, float(value.min))
        put('gauge_max', f'{family}_max', labels, float(value.max))
  out = []
  for (kind, family), bucket in sorted(samples.items()):
    names = sorted(label_names[(kind, family)])
    rows = [([dict(labels).get(n, '') for n in names], value) for labels, value in sorted(bucket.items())]
    if kind == 'counter':
      metric = CounterMetricFamily(family, f'Beam counter {family}', labels=names)
      for values, value in rows:
        metric.add_metric(values, value)
    elif kind == 'summary_count':
      metric = SummaryMetricFamily(family, f'Beam distribution {family}', labels=names)
      sums = samples[('summary_sum', family)]
      for labels, count in sorted(bucket.items()):
        metric.add_metric([dict(labels).get(n, '') for n in names], count, sums[labels])
    elif kind == 'summary_sum':
      continue
    else:
      metric = GaugeMetricFamily(family, f'Beam gauge {family}', labels=names)
      for values, value in rows:
        metric.add_metric(values, value)
    out.append(metric)
  return out


FINAL_RESPONSE_GRACE_S = 1.0


class BeamMetricsCollector(Collector):
  """A prometheus-client collector over the latest snapshot of a job's metrics.

  `update(result)` takes a snapshot (thread-safe); `collect()` serves it.
  `final_scraped` is set once a scrape has read the values of a finished job.
  """

  def __init__(self, pipeline_name: str):
    self._name = pipeline_name
    self._lock = threading.Lock()
    self._metrics: dict = {}
    self._state = 'STARTING'
    self._final = False
    self.final_scraped = threading.Event()

  def update(self, result, final: bool = False) -> None:
    metrics = query(result)
    state = str(getattr(result, 'state', 'UNKNOWN'))
    with self._lock:
      self._metrics, self._state, self._final = metrics, state, final

  def collect(self) -> Iterable:
    with self._lock:
      metrics, state, final = self._metrics, self._state, self._final
    info = GaugeMetricFamily(
      'beam_dl_job_info', 'The exported job: 1, labelled with pipeline and state', labels=['pipeline', 'state']
    )
    info.add_metric([self._name, state], 1.0)
    yield info
    yield from families(metrics, {'pipeline': self._name})
    if final:
      self.final_scraped.set()


class MetricsExporter:
  """Serves and/or pushes one job's metrics; see the module docstring."""

  def __init__(
    self,
    pipeline_name: str,
    port: int | None = None,
    address: str = '127.0.0.1',
    poll_secs: float = 5.0,
    pushgateway: str | None = None,
    job: str | None = None,
  ):
    self.registry = CollectorRegistry(auto_describe=False)
    self.collector = BeamMetricsCollector(pipeline_name)
    self.registry.register(self.collector)
    self._poll_secs, self._pushgateway, self._job = poll_secs, pushgateway, job or pipeline_name
    self._server = None
    self._stop = threading.Event()
    self._poller: threading.Thread | None = None
    self.port = None
    if port is not None:
      self._server, _ = start_http_server(port, addr=address, registry=self.registry)
      self.port = self._server.server_port
      _log.info('Prometheus metrics at http://%s:%d/metrics', address, self.port)

  def watch(self, result) -> None:
    """Reads `result`'s metrics every poll interval until `finish`."""

    def poll():
      while not self._stop.wait(self._poll_secs):
        try:
          self.collector.update(result)
        except Exception as err:  # a runner that can't report yet must not stop the job
          _log.debug('metrics not readable yet: %s', err)

    self._poller = threading.Thread(target=poll, name='beam-dl-metrics-poll', daemon=True)
    self._poller.start()

  def finish(self, result) -> None:
    """Stops polling, sets the final values and pushes them if asked to."""
    self._stop.set()
    if self._poller is not None:
      self._poller.join()
    self.collector.update(result, final=True)
    if self._pushgateway:
      push_to_gateway(self._pushgateway, job=self._job, registry=self.registry)
      _log.info('pushed metrics to the Pushgateway at %s (job %s)', self._pushgateway, self._job)

  def linger(self, secs: float) -> bool:
    """Waits until the final values were scraped once, at most `secs`; True if they were.

    `final_scraped` is set inside the scrape's `collect()`, before the HTTP
    server writes that response: returning at once let the process exit
    with the response unsent (the scraper saw an empty reply, once in a CI
    run), so the last scrape gets `FINAL_RESPONSE_GRACE_S` to go out.
    """
    if self._server is None or secs <= 0 or not self.collector.final_scraped.wait(secs):
      return False
    time.sleep(FINAL_RESPONSE_GRACE_S)
    return True

  def close(self) -> None:
    self._stop.set()
    if self._server is not None:
      self._server.shutdown()
      self._server.server_close()
      self._server = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def keep_direct_runner_in_process(pipeline) -> None:
  """The DirectRunner runs `pipeline` on Beam's in-process FnApiRunner (or,
  streaming, its streaming DirectRunner), never on a downloaded Prism.

  Beam's DirectRunner first tries Prism for pipelines it deems supported,
  downloading the binary from GitHub at run time: with network access the same
  command would run on another engine than the one the project tests (and
  score_sequences' batch graph panics on Prism 2.77), without it every run
  waits for the failed download (~0.7 s here) and then falls back. Prism stays
  one flag away: `--runner=PrismRunner`. Beam skips Prism for interactive
  runners; that switch does nothing else (apache_beam/runners/direct/direct_runner.py).
  """
  from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner

  if isinstance(pipeline.runner, SwitchingDirectRunner):
    pipeline.runner.is_interactive()


def run_pipeline(pipeline, options, name: str | None = None):
  """Runs `pipeline` to completion, exporting its metrics as `MetricsOptions` say.

  Without --metrics_port or --metrics_pushgateway this is `run()` +
  `wait_until_finish()`. Returns the PipelineResult.
  """
  from beam_dl import beam_fixes
  from beam_dl.cli.options import MetricsOptions

  beam_fixes.log_active()
  keep_direct_runner_in_process(pipeline)
  opts = options.view_as(MetricsOptions)
  if opts.metrics_port is None and not opts.metrics_pushgateway:
    result = pipeline.run()
    result.wait_until_finish()
    return result
  with MetricsExporter(
    name or 'beam_dl',
    opts.metrics_port,
    opts.metrics_address,
    opts.metrics_poll_secs,
    opts.metrics_pushgateway,
    opts.metrics_job,
  ) as exporter:
    started = time.monotonic()
    result = pipeline.run()
    exporter.watch(result)
    result.wait_until_finish()  # a failed job raises here; the endpoint closes with it
    exporter.finish(result)
    _log.info('job finished after %.1fs; final metrics exported', time.monotonic() - started)
    exporter.linger(opts.metrics_linger_secs)
  return result
