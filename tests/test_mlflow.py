"""MLflow model registry against a real `mlflow server` the tests start.

pipelines.train logs a run and registers version 1 of "digits" with alias
"champion"; the conftest digits model becomes version 2. Then: the run's
params, metric curves and artifacts are on the server; `models:/` URIs
(by version and by alias) serve through the handler and classify_images
exactly like the local directories they came from, downloaded once per
process; and the alias watcher turns alias moves into ModelMetadata that
RunInference follows.
"""

import os

os.environ.setdefault('MLFLOW_DISABLE_TELEMETRY', 'true')

import apache_beam as beam  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from apache_beam.ml.inference.base import KeyedModelHandler, ModelMetadata, RunInference  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402
from apache_beam.transforms import trigger, window  # noqa: E402
from apache_beam.transforms.window import TimestampedValue  # noqa: E402
from apache_beam.utils.timestamp import Timestamp  # noqa: E402

from beam_dl.beam_fixes import side_input_commit  # noqa: E402
from beam_dl.decoding.images import ImageSpec, decode_image  # noqa: E402
from beam_dl.formats.jsonl import read_jsonl  # noqa: E402
from beam_dl.models import checkpoints  # noqa: E402
from beam_dl.operations import registry_mlflow
from beam_dl.serving.handler import JaxModelHandler  # noqa: E402
from pipelines import classify_images  # noqa: E402
from pipelines import train as train_cli  # noqa: E402
from tests import services  # noqa: E402
from tests.imaging import digits_uint8, encode  # noqa: E402

mlflow = pytest.importorskip('mlflow')
SLOW = pytest.mark.slow  # a real server start, one training run


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  with services.mlflow_server(str(tmp_path_factory.mktemp('mlflow_server'))) as uri:
    yield uri


@pytest.fixture(scope='module')
def registered(server, tmp_path_factory, digits_model_dir):
  """{'workdir', 'summary', 'v2_dir'}: v1 from pipelines.train (alias
  champion), v2 = the conftest digits model logged by log_training_run."""
  workdir = str(tmp_path_factory.mktemp('train'))
  summary = train_cli.main([
      '--config', 'pipelines/configs/digits_cnn.py:runlocal', '--workdir', workdir,
      '--set', 'num_steps=40', '--set', 'log_every=10', '--set', 'checkpoint_every=40', '--log_level', 'WARNING',
      '--mlflow_tracking_uri', server, '--mlflow_model_name', 'digits', '--mlflow_alias', 'champion',
      '--mlflow_experiment', 'beam_dl_tests',
  ])  # fmt: skip
  v2 = registry_mlflow.log_training_run(
    digits_model_dir, params={'source': 'conftest'}, model_name='digits', tracking_uri=server
  )
  assert v2.uri == 'models:/digits/2'
  return {'workdir': workdir, 'summary': summary, 'v2_dir': digits_model_dir}


def client(uri):
  return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@SLOW
def test_train_logs_params_metrics_artifacts_and_registers_a_version(server, registered):
  summary = registered['summary']
  assert summary['mlflow']['model_uri'] == 'models:/digits/1'
  c = client(server)
  run = c.get_run(summary['mlflow']['run_id'])
  assert run.info.status == 'FINISHED'
  assert c.get_experiment(run.info.experiment_id).name == 'beam_dl_tests'
  assert run.data.params['config.num_steps'] == '40'
  assert run.data.params['config.model'] == 'small_cnn'
  assert run.data.params['config.data.kind'] == 'images'
  loss = c.get_metric_history(run.info.run_id, 'loss')
  assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [10, 20, 30, 40]
  assert run.data.metrics['eval_accuracy'] == pytest.approx(summary['eval']['accuracy'])
  names = {a.path for a in c.list_artifacts(run.info.run_id, 'model')}
  assert {'model/spec.json', 'model/variables'} <= names
  version = c.get_model_version('digits', '1')
  assert version.run_id == run.info.run_id and version.source.endswith('/model')
  assert c.get_model_version_by_alias('digits', 'champion').version == '1'


@SLOW
def test_registry_uris_load_the_registered_bytes_once_per_process(server, registered, monkeypatch):
  monkeypatch.setenv('MLFLOW_TRACKING_URI', server)
  local_spec, local_vars = checkpoints.load(os.path.join(registered['workdir'], 'model'))
  spec, variables = checkpoints.load('models:/digits@champion')
  assert spec == local_spec
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(local_vars)):
    np.testing.assert_array_equal(a, b)
  # The alias and its version share one download; the handler serves it.
  assert registry_mlflow.local_model_dir('models:/digits@champion') == registry_mlflow.local_model_dir(
    'models:/digits/1'
  )
  model = JaxModelHandler('models:/digits/2').load_model()
  assert model.spec == checkpoints.load_spec(registered['v2_dir'])


def test_registry_uris_parse():
  assert registry_mlflow.parse('models:/digits/12') == registry_mlflow.ModelRef('digits', version='12')
  assert registry_mlflow.parse('models:/digits@champion').uri == 'models:/digits@champion'
  for bad in ('models:/digits', 'models:/digits/v2', 'models:/a/1/extra', 'runs:/abc/model'):
    with pytest.raises(registry_mlflow.RegistryError, match='not models:/'):
      registry_mlflow.parse(bad)
  assert not registry_mlflow.is_registry_uri('/models/digits')


def test_alias_polls_emit_only_moves_and_ignore_stale_ones():
  state, emitted = None, []
  for tick, uri in ((1, 'v1'), (2, 'v1'), (4, 'v2'), (3, 'v1'), (5, 'v2'), (6, 'v1')):
    state, emit = registry_mlflow.after_poll(state, tick, uri)
    emitted += [uri] if emit else []
  assert emitted == ['v1', 'v2', 'v1'] and state == (6, 'v1')


@SLOW
def test_unknown_alias_fails_with_the_reason(server, registered):
  with pytest.raises(registry_mlflow.RegistryError, match='nobody'):
    registry_mlflow.local_model_dir('models:/digits@nobody', tracking_uri=server)


@SLOW
def test_classify_images_serves_a_registry_alias(server, registered, tmp_path, monkeypatch):
  monkeypatch.setenv('MLFLOW_TRACKING_URI', server)
  images, _ = digits_uint8()
  pngs = {str(tmp_path / f'{i}.png'): encode(image, 'PNG') for i, image in enumerate(images[-8:])}
  for path, data in pngs.items():
    with open(path, 'wb') as f:
      f.write(data)
  out = str(tmp_path / 'out' / 'pred')
  classify_images.run([f'--input={tmp_path}/*.png', '--model_dir=models:/digits@champion', f'--output={out}'])
  assert read_jsonl(out + '_failed-*.jsonl') == []
  served = {r['key']: (r['label'], r['scores']) for r in read_jsonl(out + '-[0-9]*.jsonl')}
  # The same bytes through the locally exported model, without Beam or MLflow.
  local = JaxModelHandler(os.path.join(registered['workdir'], 'model')).load_model()
  keys = sorted(pngs)
  scores = local.predict([decode_image(pngs[k], ImageSpec(8, 8, channels=1)) for k in keys])
  assert sorted(served) == keys
  for key, row in zip(keys, scores):
    label, served_scores = served[key]
    assert label == int(np.argmax(row))
    np.testing.assert_allclose(served_scores, jax.nn.softmax(row), atol=1e-5)


@SLOW
def test_alias_moves_become_model_metadata(server, registered):
  """Each tick moves the alias (a real registry call) before the watcher
  polls: v1, v1, v2, v2 -> exactly one ModelMetadata per move."""

  def promote(tick):
    registry_mlflow.set_alias('digits', 'canary', '1' if tick < 2 else '2', tracking_uri=server)
    return tick

  with TestPipeline('FnApiRunner') as p:
    moves = (
      p
      | beam.Create([0, 1, 2, 3], reshuffle=False)
      | 'Promote' >> beam.Map(promote)
      | registry_mlflow.AliasMoves('digits', 'canary', tracking_uri=server)
    )
    assert_that(
      moves,
      equal_to(
        [
          ModelMetadata('models:/digits/1', 'models:/digits@canary'),
          ModelMetadata('models:/digits/2', 'models:/digits@canary'),
        ]
      ),
    )


def test_newest_per_firing_keeps_one_element_the_newest():
  """Repeated and several moves in one firing: one element, the newest."""
  v1, v2 = ModelMetadata('models:/m/1', 'models:/m@a'), ModelMetadata('models:/m/2', 'models:/m@a')
  stamped = [TimestampedValue(v1, 10), TimestampedValue(v2, 20), TimestampedValue(v2, 20), TimestampedValue(v1, 5)]
  with TestPipeline('FnApiRunner') as p:
    newest = (
      p
      | beam.Create(stamped)
      | beam.WindowInto(
        window.GlobalWindows(),
        trigger=trigger.Repeatedly(trigger.AfterProcessingTime(1)),
        accumulation_mode=trigger.AccumulationMode.DISCARDING,
      )
      | registry_mlflow.NewestPerFiring()
    )
    assert_that(newest, equal_to([v2]))


@SLOW
@pytest.mark.parametrize('beam_side_inputs', [False, True], ids=['fixed-runner', 'beams-runner'])
def test_run_inference_follows_the_alias_watcher(server, registered, monkeypatch, beam_side_inputs):
  """The handler starts on version 1; the watcher reports the alias at
  version 2 and RunInference serves version 2's weights.

  The polls start 2 s ahead, so the watcher's stages run in several bundles
  (each poll defers until its time): on Beam's own FnApiRunner that repeats
  the side input's element once per bundle (docs/beam_fixes.md,
  `side_input_commit`), and the watcher's one element per firing must hold
  with or without that fix."""
  if beam_side_inputs:
    side_input_commit.revert()
  monkeypatch.setenv('MLFLOW_TRACKING_URI', server)
  registry_mlflow.set_alias('digits', 'production', 2, tracking_uri=server)
  images, _ = digits_uint8()
  examples = [(f'd{i}', images[i][..., None]) for i in range(4)]
  v2 = JaxModelHandler(registered['v2_dir']).load_model()
  want = dict(zip([k for k, _ in examples], np.argmax(v2.predict([x for _, x in examples]), -1)))
  start = Timestamp.now() + 2
  try:
    run_following_the_alias(server, examples, want, start)
  finally:
    side_input_commit.apply()


def run_following_the_alias(server, examples, want, start):
  with TestPipeline('FnApiRunner') as p:
    watch = p | registry_mlflow.WatchModelAlias(
      'digits', 'production', interval=0.5, tracking_uri=server, start_timestamp=start, stop_timestamp=start + 1
    )
    served = (
      p
      | beam.Create(examples)
      | RunInference(KeyedModelHandler(JaxModelHandler('models:/digits/1')), model_metadata_pcoll=watch)
      | beam.Map(lambda kv: (kv[0], kv[1].model_id, int(np.argmax(kv[1].inference))))
    )
    assert_that(served, equal_to([(k, 'models:/digits/2', want[k]) for k in want]))
