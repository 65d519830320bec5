"""Test-wide settings.

Eight fake CPU devices so sharding tests (mesh, NamedSharding, shard_map, pmap)
run on a laptop or CI; set before anything imports jax, as Flax's own tests do.
"""

import os

TESTS_SET_XLA_FLAGS = 'BEAM_DL_TESTS_SET_XLA_FLAGS'
if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  os.environ[TESTS_SET_XLA_FLAGS] = '1'  # what a user runs (docs commands) gets the user's XLA_FLAGS
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digits_model_dir(tmp_path_factory):
  """A SmallCNN trained for a few seconds on real digits, saved with orbax.

  Good enough (>90% held-out) that predictions are meaningful, small enough
  that every pipeline test can share it.
  """
  from beam_dl.models import checkpoints
  from beam_dl.training.quick import fit_arrays
  from pipelines import demo

  x_train, _, y_train, _ = demo.digit_images()
  spec = checkpoints.ModelSpec(
    name='small_cnn',
    kwargs={'num_classes': 10, 'features': [16, 32], 'hidden': 64},
    input_shape=demo.INPUT_SPEC_SHAPE,
    input_dtype='uint8',
    input_scale=1 / 255,
    labels=[str(d) for d in range(10)],
  )
  variables, _ = fit_arrays(spec, (x_train[..., None],), y_train, steps=250, learning_rate=3e-3)
  return checkpoints.save(str(tmp_path_factory.mktemp('digits') / 'model'), spec, variables)


@pytest.fixture(scope='session')
def co2_lstm_dir(tmp_path_factory):
  """A one-feature LSTM forecaster trained for a few steps on the CO2 series.

  For streaming tests that check plumbing (every event scored, scores equal
  to batch), not accuracy.
  """
  from pipelines import score_sequences_demo as demo

  path = str(tmp_path_factory.mktemp('co2_lstm'))
  _, values = demo.load_series()
  demo.train_model(path, values[:120], steps=5)
  return path


def _direct_runner_in_process():
  """Tests' own pipelines on the DirectRunner run in process like the
  pipelines' (`beam_dl.operations.metrics_export.keep_direct_runner_in_process`), not
  on Prism after Beam's download attempt (~0.7 s a run offline)."""
  from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner

  SwitchingDirectRunner._is_interactive = True  # pylint: disable=protected-access


_direct_runner_in_process()
