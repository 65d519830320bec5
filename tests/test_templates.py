"""Dataflow submission, checked offline: templates, job graphs, containers.

- Every pipeline in the runner matrix has a Flex Template metadata file
  (pipelines/templates/<name>.json) that Dataflow's own types accept, whose
  parameters are exactly the pipeline's flags (required <-> not optional),
  and whose regexes and enum options agree with the pipeline's validation.
- The pipeline's own validation gives clear errors (missing flags, bad
  choices, bad numbers).
- The Dataflow job is built offline: `--dry_run=True` yields the Runner API
  pipeline Dataflow would receive, and a classic template JSON is written
  with a localhost endpoint; both contain the pipeline's steps and the SDK
  container image.
- docker/ files pin Beam's SDK image at the installed Beam version and
  install with constraints.txt.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import shutil
import sys
import tarfile

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from beam_dl.cli import options as options_lib
from tests import runner_matrix as rm

TEMPLATES = os.path.join(rm.REPO, 'pipelines', 'templates')
DOCKER = os.path.join(rm.REPO, 'docker')
IMAGE = 'us-central1-docker.pkg.dev/my-project/beam-dl/worker:0.1.0'
DATAFLOW_FLAGS = ['--runner=DataflowRunner', '--project=my-project', '--region=us-central1']
PIPELINES = [name for name, case in rm.PIPELINES.items() if case.template and rm.pipeline_exists(case.module)]


def metadata(pipeline: str) -> dict:
  with open(os.path.join(TEMPLATES, rm.PIPELINES[pipeline].template)) as f:
    return json.load(f)


def own_option_actions(pipeline: str) -> dict[str, argparse.Action]:
  """flag name -> argparse action, for the beam_dl option groups the pipeline module uses."""
  module = importlib.import_module(rm.PIPELINES[pipeline].module)
  parser = argparse.ArgumentParser()
  for value in vars(module).values():
    if (
      inspect.isclass(value)
      and issubclass(value, PipelineOptions)
      and value.__module__.split('.')[0] in rm.PROJECT_PACKAGES
    ):
      value._add_argparse_args(parser)
  return {a.dest: a for a in parser._actions if a.dest != 'help'}


def required_options(pipeline: str) -> set[str]:
  """The flags the pipeline refuses to start without, from its own OptionsError."""
  module = importlib.import_module(rm.PIPELINES[pipeline].module)
  options = PipelineOptions([])
  with pytest.raises(options_lib.OptionsError) as error:
    module.build(beam.Pipeline(options=options), options)
  return set(re.findall(r'--(\w+)', str(error.value)))


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_metadata_is_valid_for_dataflow(pipeline):
  dataflow = pytest.importorskip('google.cloud.dataflow_v1beta3')
  with open(os.path.join(TEMPLATES, rm.PIPELINES[pipeline].template)) as f:
    parsed = dataflow.TemplateMetadata.from_json(f.read())  # raises on unknown field names
  assert parsed.name and parsed.description and parsed.parameters
  for parameter in parsed.parameters:
    assert parameter.label and parameter.help_text, parameter.name


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_template_parameters_are_the_pipeline_options(pipeline):
  case = rm.PIPELINES[pipeline]
  parameters = {p['name']: p for p in metadata(pipeline)['parameters']}
  own = own_option_actions(pipeline)
  known = set(PipelineOptions([]).get_all_options())
  assert set(parameters) <= known, f'parameters the pipeline does not accept: {set(parameters) - known}'
  expected = set(own) - set(case.template_omit)
  assert expected <= set(parameters), f'pipeline flags with no template parameter: {expected - set(parameters)}'
  assert not set(case.template_omit) & set(parameters)
  required = required_options(pipeline)
  assert required, 'expected the pipeline to require some flags'
  assert {n for n, p in parameters.items() if not p['isOptional']} == required - set(case.template_optional)
  for name in case.template_optional:
    assert parameters[name]['isOptional'] and name in required, name
  # The launcher passes every parameter as --name=value: a store_true flag would refuse it.
  store_true = {n for n, a in own.items() if isinstance(a, argparse._StoreTrueAction)}
  assert not store_true & set(parameters), store_true & set(parameters)


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_template_regexes_agree_with_the_pipeline(pipeline):
  own = own_option_actions(pipeline)
  for parameter in metadata(pipeline)['parameters']:
    name, regexes = parameter['name'], parameter.get('regexes', [])
    assert regexes, f'{name}: give Dataflow a regex to check the value at launch'

    def valid(value):
      return all(re.fullmatch(r, value) for r in regexes)

    action = own.get(name)
    if parameter['paramType'].startswith('GCS_'):
      assert valid('gs://my-bucket/some/path*') and not valid('') and not valid('/local/path'), name
    if parameter['paramType'] == 'ENUM':
      values = [o['value'] for o in parameter['enumOptions']]
      assert all(valid(v) for v in values) and not valid('bogus'), name
      if action is not None and action.choices:
        assert set(values) == set(action.choices), name
    if 'defaultValue' in parameter:
      assert valid(parameter['defaultValue']), name
      if action is not None:
        assert str(action.default) == parameter['defaultValue'], name
    if parameter['paramType'] == 'NUMBER':
      assert valid('1') and not valid('-3') and not valid('x'), name
      if action is not None and action.type is options_lib.positive_int:
        assert not valid('0'), name


def test_classify_images_enumerates_its_input_formats():
  from pipelines import classify_images

  (parameter,) = [p for p in metadata('classify_images')['parameters'] if p['name'] == 'input_format']
  assert [o['value'] for o in parameter['enumOptions']] == list(classify_images.INPUT_FORMATS)


def test_classify_images_validation_errors_are_clear(capsys):
  from pipelines import classify_images

  options = PipelineOptions([])
  with pytest.raises(options_lib.OptionsError, match='--input, --model_dir, --output'):
    classify_images.build(beam.Pipeline(options=options), options)
  with pytest.raises(options_lib.OptionsError, match=r"--input_format must be one of .*'zip'"):
    classify_images.input_format('x/*', 'zip')
  for bad, message in (
    ('--max_batch_size=0', "expected a positive integer, got '0'"),
    ('--precision=fp8', "invalid choice: 'fp8'"),
  ):
    with pytest.raises(SystemExit):
      PipelineOptions([bad]).view_as(options_lib.InferenceOptions).handler_kwargs()
    assert message in capsys.readouterr().err


def test_option_validation_helpers():
  assert options_lib.positive_int('12') == 12
  for bad in ('0', '-1', 'x', '1.5', ''):
    with pytest.raises(argparse.ArgumentTypeError, match='positive integer'):
      options_lib.positive_int(bad)
  options = PipelineOptions(['--input_format=zip', '--output=/tmp/x'])
  with pytest.raises(options_lib.OptionsError, match=r"--input_format must be one of files, tfrecord; got 'zip'"):
    options_lib.check_choice(options, 'input_format', ('files', 'tfrecord'))
  assert options_lib.check_choice(options, 'model_dir', ('a',)) is None  # not given
  with pytest.raises(options_lib.OptionsError, match="--output must be a gs:// path; got '/tmp/x'"):
    options_lib.check_pattern(options, 'output', r'gs://.+', 'a gs:// path')
  assert options_lib.check_pattern(options, 'output', r'/.+', 'absolute') == '/tmp/x'


def test_on_off_flags_take_the_values_a_flex_template_passes():
  from pipelines import score_sequences  # noqa: F401  (registers --forecast)

  def forecast(*argv):
    return PipelineOptions(list(argv)).get_all_options()['forecast']

  assert (forecast(), forecast('--forecast'), forecast('--forecast=true'), forecast('--forecast=false')) == (
    False,
    True,
    True,
    False,
  )
  with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
    options_lib.switch('maybe')


def _step_names(pipeline_proto) -> set[str]:
  return {t.unique_name for t in pipeline_proto.components.transforms.values()}


@pytest.fixture(scope='module')
def classify_data(tmp_path_factory):
  return rm.prepared_data(str(tmp_path_factory.getbasetemp() / 'matrix_data'), 'classify_images')


def test_dataflow_dry_run_builds_the_job_offline(classify_data, tmp_path):
  argv = (
    rm.classify_images_argv(classify_data, str(tmp_path))
    + DATAFLOW_FLAGS
    + ['--dry_run=True', '--temp_location=gs://beam-dl-bucket/tmp', f'--sdk_container_image={IMAGE}']
  )
  result = rm.build_graph('classify_images', argv).run()
  result.wait_until_finish()
  proto = result.job.proto_pipeline
  steps = _step_names(proto)
  for step in ('ReadImageFiles', 'ClassifyImages/DecodeImages', 'WritePredictions', 'WriteFailures'):
    assert step in steps, sorted(steps)
  assert any('RunInference' in s for s in steps)
  images = [
    beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
    for env in proto.components.environments.values()
    if env.urn == 'beam:env:docker:v1'
  ]
  assert IMAGE in images


def test_classic_template_is_written_offline(classify_data, tmp_path):
  """A localhost endpoint makes Beam skip GCS checks: the template, the staged
  Runner API pipeline and the project's sdist (--setup_file) land locally."""
  staging, temp = tmp_path / 'staging', tmp_path / 'temp'
  staging.mkdir(), temp.mkdir()
  template = tmp_path / 'classify_images_template.json'
  argv = (
    rm.classify_images_argv(classify_data, str(tmp_path / 'out'))
    + DATAFLOW_FLAGS
    + [
      '--dataflow_endpoint=http://localhost:1',
      '--no_auth',
      f'--temp_location={temp}',
      f'--staging_location={staging}',
      f'--template_location={template}',
      f'--setup_file={rm.REPO}/setup.py',
      f'--sdk_container_image={IMAGE}',
    ]
  )
  egg_info = os.path.join(rm.REPO, 'beam_dl.egg-info')
  had_egg_info = os.path.exists(egg_info)
  try:
    outcome = rm.run_pipeline('pipelines.classify_images', argv, str(tmp_path / 'build.log'), timeout_s=180)
  finally:
    if not had_egg_info:  # `setup.py sdist` leaves it next to setup.py
      shutil.rmtree(egg_info, ignore_errors=True)
  assert outcome.returncode == 0, outcome.log[-3000:]
  job = json.loads(template.read_text())
  assert job['type'] == 'JOB_TYPE_BATCH'
  (pool,) = job['environment']['workerPools']
  assert IMAGE in json.dumps(pool)
  staged = {p['name'] for p in pool['packages']}
  assert 'workflow.tar.gz' in staged
  pipeline_url = next(v for k, v in job['environment']['sdkPipelineOptions']['options'].items() if k == 'pipelineUrl')
  with open(pipeline_url, 'rb') as f:
    steps = _step_names(beam_runner_api_pb2.Pipeline.FromString(f.read()))
  assert {'ReadImageFiles', 'ClassifyImages/DecodeImages', 'WritePredictions'} <= steps
  with tarfile.open(staging / 'workflow.tar.gz') as sdist:
    names = sdist.getnames()
  for module in (
    'beam_dl/serving/handler.py',
    'transforms/images.py',
    'pipelines/classify_images.py',
    'pipelines/templates/classify_images.json',
  ):
    assert any(n.endswith(module) for n in names), module


def _dockerfile(name: str) -> str:
  with open(os.path.join(DOCKER, name)) as f:
    return f.read()


def _pinned(package: str) -> str:
  with open(os.path.join(rm.REPO, 'constraints.txt')) as f:
    return re.search(rf'^{re.escape(package)}==(\S+)$', f.read(), re.M).group(1)


@pytest.mark.parametrize('name', ['Dockerfile', 'Dockerfile.gpu', 'Dockerfile.flex'])
def test_dockerfiles_install_the_project_with_the_pinned_constraints(name):
  text = _dockerfile(name)
  assert 'COPY constraints.txt setup.py' in text
  assert re.search(r'pip install [^\n]*-c constraints\.txt \.', text)
  for package in ('beam_dl', 'transforms', 'pipelines'):
    assert f'COPY {package} ' in text


def test_worker_images_match_the_submitting_beam_and_python():
  python = f'{sys.version_info.major}{sys.version_info.minor}'
  assert beam.__version__ == _pinned('apache-beam')
  for name in ('Dockerfile', 'Dockerfile.gpu'):
    text = _dockerfile(name)
    assert f'ARG BEAM_VERSION={beam.__version__}' in text
    assert f'FROM apache/beam_python{sys.version_info.major}.{sys.version_info.minor}_sdk:${{BEAM_VERSION}}' in text
    assert f"apache_beam.__version__ == '{beam.__version__}'" in text
  gpu = _dockerfile('Dockerfile.gpu')
  assert f'ARG JAX_VERSION={_pinned("jax")}' in gpu and 'jax[cuda12]==${JAX_VERSION}' in gpu
  assert 'COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam' in gpu
  assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in gpu
  flex = _dockerfile('Dockerfile.flex')
  assert f'FROM gcr.io/dataflow-templates-base/python{python}-template-launcher-base' in flex


def test_flex_launcher_runs_a_pipeline_file_that_exists():
  flex = _dockerfile('Dockerfile.flex')
  default = re.search(r'ARG PIPELINE=(\w+)', flex).group(1)
  assert 'FLEX_TEMPLATE_PYTHON_PY_FILE="${WORKDIR}/pipelines/${PIPELINE}.py"' in flex
  assert os.path.exists(os.path.join(rm.REPO, 'pipelines', f'{default}.py'))
  assert 'FLEX_TEMPLATE_PYTHON_SETUP_FILE="${WORKDIR}/setup.py"' in flex
  # The launcher runs the file as a script: it must run the pipeline under __main__.
  with open(os.path.join(rm.REPO, 'pipelines', f'{default}.py')) as f:
    assert "if __name__ == '__main__':" in f.read()
