"""MLflow model registry: record training runs, serve `models:/` URIs, follow aliases.

Training logs a run (params, metric curves, the exported model directory as
the run's `model` artifact) and registers it as a new version of a
registered model. Serving accepts a registry URI wherever it takes a model
directory:

    models:/digits/3           version 3 of registered model "digits"
    models:/digits@champion    the version the alias "champion" points at

`local_model_dir(uri)` turns one into a local beam_dl model directory
through MLflow's own artifact download (from the tracking server's artifact
proxy, or the store's artifact root), once per process: the handler's
shared-model loading and every pipeline step that reads the spec reuse the
first download. `beam_dl.models.checkpoints` calls it, so the handler, the
pipelines and `checkpoints.load` all take registry URIs unchanged.

An alias is resolved once, to a version, when first served; to follow it
while a pipeline runs, `WatchModelAlias` polls the registry and emits a
`ModelMetadata` naming the version URI each time the alias moves, for
RunInference's `model_metadata_pcoll`.

The tracking (and registry) URI is MLflow's: the `tracking_uri=` argument,
else `MLFLOW_TRACKING_URI`, else MLflow's default local store
(`sqlite:///mlflow.db`). Remote workers need MLFLOW_TRACKING_URI in their
environment (e.g. `JaxModelHandler(..., env_vars={...})`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any, Iterable, Mapping, Optional

import apache_beam as beam
from apache_beam.ml.inference.base import ModelMetadata
from apache_beam.transforms import trigger, window
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

SCHEME = 'models:/'
ARTIFACT_PATH = 'model'  # the run artifact holding the beam_dl model directory
_URI = re.compile(r'models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?')
_log = logging.getLogger(__name__)

# Local copies of registry models downloaded by this process, by the URI
# asked for (an alias URI and its version URI both map to the same copy).
_LOCAL: dict[str, str] = {}
_LOCAL_LOCK = threading.Lock()


class RegistryError(ValueError):
  """A `models:/` URI that is malformed or names nothing in the registry."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """A registered model version, by number or by alias."""

  name: str
  version: Optional[str] = None
  alias: Optional[str] = None

  @property
  def uri(self) -> str:
    return version_uri(self.name, self.version) if self.version else f'{SCHEME}{self.name}@{self.alias}'


def is_registry_uri(path: Any) -> bool:
  """True for `models:/...` strings (the handler's and pipelines' model_dir)."""
  return isinstance(path, str) and path.startswith(SCHEME)


def parse(uri: str) -> ModelRef:
  """`models:/<name>/<version>` or `models:/<name>@<alias>` -> ModelRef."""
  match = _URI.fullmatch(uri)
  if not match:
    raise RegistryError(f'{uri!r} is not models:/<name>/<version> or models:/<name>@<alias>')
  return ModelRef(match['name'], match['version'], match['alias'])


def version_uri(name: str, version: str | int) -> str:
  return f'{SCHEME}{name}/{version}'


def _client(tracking_uri: Optional[str]):
  import mlflow  # imported on use: serving local directories never needs it

  return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def current_version(name: str, alias: str, tracking_uri: Optional[str] = None) -> str:
  """The version number the alias points at now (RegistryError if none)."""
  from mlflow.exceptions import MlflowException

  try:
    return str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
  except MlflowException as e:
    raise RegistryError(f'{SCHEME}{name}@{alias}: {e.message}') from e


def resolve(uri: str, tracking_uri: Optional[str] = None) -> ModelRef:
  """The URI with an alias replaced by the version it points at now."""
  ref = parse(uri)
  if ref.alias:
    ref = ModelRef(ref.name, current_version(ref.name, ref.alias, tracking_uri))
  return ref


def local_model_dir(uri: str, tracking_uri: Optional[str] = None) -> str:
  """A local directory holding the registered model `uri` names.

  Downloaded through `mlflow.artifacts.download_artifacts` the first time
  this process asks for `uri` (or for the version an alias resolves to);
  later calls return the same directory. Thread-safe: concurrent first calls
  download once.
  """
  with _LOCAL_LOCK:
    if uri in _LOCAL:
      return _LOCAL[uri]
    ref = resolve(uri, tracking_uri)
    if ref.uri not in _LOCAL:
      from mlflow import artifacts
      from mlflow.exceptions import MlflowException

      try:
        _LOCAL[ref.uri] = artifacts.download_artifacts(ref.uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)
      except MlflowException as e:
        raise RegistryError(f'{ref.uri}: {e.message}') from e
      _log.info('downloaded %s (asked as %s) to %s', ref.uri, uri, _LOCAL[ref.uri])
    _LOCAL[uri] = _LOCAL[ref.uri]
    return _LOCAL[uri]


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat strings."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def numeric_metrics(record: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  """The int/float entries of one history record (step excluded), prefixed."""
  return {
    f'{prefix}{k}': float(v)
    for k, v in record.items()
    if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool)
  }


@dataclasses.dataclass(frozen=True)
class RegisteredRun:
  """What `log_training_run` recorded: the run and the new model version."""

  run_id: str
  name: Optional[str]
  version: Optional[str]

  @property
  def uri(self) -> Optional[str]:
    return version_uri(self.name, self.version) if self.version else None


def log_training_run(
  model_dir: str,
  *,
  params: Mapping[str, Any],
  history: Iterable[Mapping[str, Any]] = (),
  eval_history: Iterable[Mapping[str, Any]] = (),
  summary: Mapping[str, Any] = (),
  model_name: Optional[str] = None,
  aliases: Iterable[str] = (),
  experiment: Optional[str] = None,
  tracking_uri: Optional[str] = None,
) -> RegisteredRun:
  """Logs one training run to MLflow and registers its model directory.

  `params` are flattened to dotted keys; `history` / `eval_history` records
  (`{'step': n, 'loss': ...}`) become metric curves (eval ones prefixed
  `eval_`); numeric `summary` entries are logged at the last step. The model
  directory is the run's `model` artifact; with `model_name` it becomes the
  next version of that registered model (created if new), and each of
  `aliases` is pointed at it.
  """
  import mlflow

  client = _client(tracking_uri)
  experiment_id = None
  if experiment:
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
  run = client.create_run(experiment_id or '0')
  run_id = run.info.run_id
  try:
    params = {k: str(v)[:6000] for k, v in flatten(params).items()}  # MLflow's param value limit
    metrics = [
      mlflow.entities.Metric(key, value, 0, int(record.get('step', 0)))
      for prefix, records in (('', history), ('eval_', eval_history))
      for record in records
      for key, value in numeric_metrics(record, prefix).items()
    ]
    last_step = max((m.step for m in metrics), default=0)
    metrics += [mlflow.entities.Metric(k, v, 0, last_step) for k, v in numeric_metrics(dict(summary)).items()]
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
      client.log_batch(run_id, metrics=metrics[start : start + 1000])
    client.log_artifacts(run_id, model_dir, artifact_path=ARTIFACT_PATH)
  except Exception:
    client.set_terminated(run_id, status='FAILED')
    raise
  client.set_terminated(run_id)
  version = None
  if model_name:
    from mlflow.exceptions import MlflowException

    try:
      client.create_registered_model(model_name)
    except MlflowException as e:
      if e.error_code != 'RESOURCE_ALREADY_EXISTS':
        raise
    version = str(
      client.create_model_version(model_name, source=f'runs:/{run_id}/{ARTIFACT_PATH}', run_id=run_id).version
    )
    for alias in aliases:
      client.set_registered_model_alias(model_name, alias, version)
  return RegisteredRun(run_id, model_name, version)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: Optional[str] = None) -> None:
  """Points `models:/<name>@<alias>` at `version` (what a promotion does)."""
  _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def alias_lookup(tick: Any, name: str, alias: str, tracking_uri: Optional[str]) -> tuple[str, tuple[float, str]]:
  """One poll: (alias URI, (tick time, version URI the alias points at now))."""
  version = current_version(name, alias, tracking_uri)
  return f'{SCHEME}{name}@{alias}', (float(tick), version_uri(name, version))


def after_poll(last: Optional[tuple[float, str]], tick: float, uri: str) -> tuple[tuple[float, str], bool]:
  """(new state, whether to emit) for one poll of an alias.

  The state is the newest (tick, version URI) seen. A poll older than it is
  stale (runners may deliver polls out of order) and changes nothing; a
  newer one is emitted if its version differs (or nothing was seen yet).
  """
  if last is not None and tick < last[0]:
    return last, False
  return (tick, uri), last is None or uri != last[1]


class _EmitOnMove(beam.DoFn):
  """Per alias, passes on a version URI only when the alias moved
  (`after_poll`), so the output is a singleton side input per move."""

  LAST = ReadModifyWriteStateSpec('last', beam.coders.PickleCoder())

  def process(self, element, last=beam.DoFn.StateParam(LAST)):
    alias_uri, (tick, uri) = element
    state, emit = after_poll(last.read(), tick, uri)
    last.write(state)
    if emit:  # stamped with its poll's time: `NewestPerFiring` keeps the newest
      yield TimestampedValue(ModelMetadata(model_id=uri, model_name=alias_uri), tick)


@beam.typehints.with_output_types(ModelMetadata)
class AliasMoves(beam.PTransform):
  """Ticks -> a `ModelMetadata` each time `models:/<name>@<alias>` moves.

  Each tick (a number, e.g. the timestamp PeriodicImpulse emits) polls the
  registry; the first poll and every later change of version emit
  `ModelMetadata(model_id='models:/<name>/<version>', model_name=<alias URI>)`.
  """

  def __init__(self, name: str, alias: str, tracking_uri: Optional[str] = None):
    super().__init__()
    self._name, self._alias, self._tracking_uri = name, alias, tracking_uri

  def expand(self, ticks):
    return (
      ticks
      | 'LookupAlias' >> beam.Map(alias_lookup, self._name, self._alias, self._tracking_uri)
      | 'EmitOnMove' >> beam.ParDo(_EmitOnMove())
    )


@beam.typehints.with_output_types(ModelMetadata)
class WatchModelAlias(beam.PTransform):
  """Polls `models:/<name>@<alias>` every `interval` seconds and emits a
  `ModelMetadata` when it moves: RunInference's `model_metadata_pcoll`.

      watch = p | WatchModelAlias('digits', 'champion', interval=60)
      p | ... | RunInference(handler, model_metadata_pcoll=watch)

  Shaped like Beam's `WatchFilePattern` (a PeriodicImpulse, then one element
  per change, in the global window with a repeated processing-time trigger)
  so the output is a singleton side input that updates.
  """

  def __init__(
    self,
    name: str,
    alias: str,
    *,
    interval: float = 60.0,
    tracking_uri: Optional[str] = None,
    start_timestamp: Optional[float] = None,
    stop_timestamp: float | Timestamp = MAX_TIMESTAMP,
  ):
    super().__init__()
    self._name, self._alias, self._tracking_uri = name, alias, tracking_uri
    self._interval, self._start, self._stop = interval, start_timestamp, stop_timestamp

  def expand(self, pbegin):
    return (
      pbegin
      | 'Poll'
      >> PeriodicImpulse(
        start_timestamp=self._start if self._start is not None else Timestamp.now(),
        stop_timestamp=self._stop,
        fire_interval=self._interval,
      )
      | 'AliasMoves' >> AliasMoves(self._name, self._alias, self._tracking_uri)
      | 'GlobalWindow'
      >> beam.WindowInto(
        window.GlobalWindows(),
        trigger=trigger.Repeatedly(trigger.AfterProcessingTime(1)),
        accumulation_mode=trigger.AccumulationMode.DISCARDING,
      )
      | 'NewestPerFiring' >> NewestPerFiring()
    )


def _stamped(element: Any, timestamp=beam.DoFn.TimestampParam) -> tuple[float, Any]:
  return float(timestamp), element


def _newest(stamped: Iterable[tuple[float, Any]]) -> Optional[tuple[float, Any]]:
  return max((pair for pair in stamped if pair is not None), key=lambda pair: pair[0], default=None)


@beam.typehints.with_output_types(ModelMetadata)
class NewestPerFiring(beam.PTransform):
  """At most one element per trigger firing: the one with the newest
  timestamp (ties: any one of them).

  A singleton side input must hold one element, and a poll that repeats (a
  retried bundle, a runner that delivers a pane twice, two moves of an alias
  inside one firing) must not fail the pipeline that reads it: the newest
  move wins, as it would have a moment later.
  """

  def expand(self, pcoll):
    return (
      pcoll
      | 'Stamp' >> beam.Map(_stamped)
      | 'Newest' >> beam.CombineGlobally(_newest).without_defaults()
      | 'Unstamp' >> beam.Map(lambda pair: pair[1])
    )
