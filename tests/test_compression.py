"""Compression on real digits and the real CO2 record: int8 model dirs served
by the unchanged pipeline, inconsistent quantization refused, pruning to a
target sparsity, distillation from a teacher, quantization-aware training."""

import json
import os

import numpy as np
import pytest
from flax import serialization

from beam_dl.compression import pruning, quantize
from beam_dl.formats.image_example import encode_image_example
from beam_dl.formats.jsonl import read_jsonl
from beam_dl.models import checkpoints
from beam_dl.serving.handler import JaxModelHandler
from beam_dl.training import datasets
from pipelines import classify_images, compress, demo
from pipelines.train import resolve_config
from tests.imaging import encode

DIGITS_CONFIG = 'pipelines/configs/digits_cnn.py'
CO2_CONFIG = 'pipelines/configs/co2_rnn.py'


@pytest.fixture(scope='module')
def digits():
  """(x_train, x_test, y_train, y_test) uint8 8x8 digits (0..255)."""
  return demo.digit_images()


@pytest.fixture(scope='module')
def digits_int8_dir(digits_model_dir, digits, tmp_path_factory):
  """The shared float digits model, quantized by the CLI and calibrated on
  its training images written as TFRecords."""
  x_train, _, y_train, _ = digits
  tmp = tmp_path_factory.mktemp('calib')
  records = [
    encode_image_example(f'train/{i}', x[..., None], int(y))
    for i, (x, y) in enumerate(zip(x_train[:256], y_train[:256]))
  ]
  pattern = datasets.write_shards(records, str(tmp / 'train'), 2)
  out = str(tmp / 'model_int8')
  summary = compress.main(
    [
      '--model_dir',
      digits_model_dir,
      '--quantize',
      'int8',
      '--output',
      out,
      '--calibration',
      pattern,
      '--calibration_examples',
      '200',
    ]
  )
  assert summary['quantization']['calibration_examples'] == 200
  return out


def _classify(model_dir, image_dir, out):
  classify_images.run([f'--input={image_dir}/*', f'--model_dir={model_dir}', f'--output={out}'])
  rows = [
    r
    for f in sorted(os.listdir(os.path.dirname(out)))
    if f.startswith(os.path.basename(out) + '-0')
    for r in read_jsonl(os.path.join(os.path.dirname(out), f))
  ]
  return {r['key'].rsplit('/', 1)[-1]: r for r in rows}


@pytest.fixture(scope='module')
def test_images(digits, tmp_path_factory):
  _, x_test, _, y_test = digits
  image_dir = tmp_path_factory.mktemp('images')
  for i, x in enumerate(x_test[:120]):
    (image_dir / f'{i:03d}.png').write_bytes(encode(x, 'PNG'))
  return str(image_dir), {f'{i:03d}.png': int(y) for i, y in enumerate(y_test[:120])}


def test_int8_dir_records_quantization_and_is_a_third_of_the_size(digits_model_dir, digits_int8_dir):
  spec = checkpoints.load_spec(digits_int8_dir)
  assert spec.quantization['method'] == 'qwix_ptq'
  assert spec.quantization['weight_dtype'] == 'int8'
  assert spec.quantization['activations'] == 'static'
  assert compress.dir_bytes(digits_int8_dir) <= compress.dir_bytes(digits_model_dir) / 3
  stored = serialization.msgpack_restore(open(f'{digits_int8_dir}/{checkpoints.MSGPACK_FILE}', 'rb').read())
  kernel = stored['params']['Dense_0']['kernel']['array']
  assert kernel['qvalue'].dtype == np.int8
  assert kernel['scale'].shape == (1, kernel['qvalue'].shape[-1])  # per output channel


def test_int8_model_serves_in_classify_images_close_to_float(digits_model_dir, digits_int8_dir, test_images, tmp_path):
  image_dir, labels = test_images
  floats = _classify(digits_model_dir, image_dir, str(tmp_path / 'float' / 'pred'))
  ints = _classify(digits_int8_dir, image_dir, str(tmp_path / 'int8' / 'pred'))
  assert set(floats) == set(ints) == set(labels)
  acc = lambda rows: np.mean([rows[k]['label'] == labels[k] for k in labels])
  assert acc(floats) > 0.85
  assert acc(ints) >= acc(floats) - 0.02
  agree = np.mean([floats[k]['label'] == ints[k]['label'] for k in labels])
  assert agree >= 0.95
  diff = max(np.max(np.abs(np.subtract(floats[k]['scores'], ints[k]['scores']))) for k in labels)
  assert diff < 0.25, diff  # softmax scores


def test_calibration_from_image_files_serves_as_well_as_from_tfrecords(
  digits_model_dir, digits, digits_int8_dir, test_images, tmp_path
):
  """`--calibration` takes the image files classify_images reads (here the
  training digits as PNG and JPEG files), decoded as served."""
  x_train, _, y_train, _ = digits
  demo.write_images(str(tmp_path / 'train'), x_train[:256], y_train[:256])
  (tmp_path / 'train' / 'notes.png').write_text('not an image: skipped and counted\n')
  out = str(tmp_path / 'model_int8')
  summary = compress.main(
    [
      '--model_dir',
      digits_model_dir,
      '--output',
      out,
      '--calibration',
      str(tmp_path / 'train' / '*'),
      '--calibration_examples',
      '200',
    ]
  )
  assert summary['quantization']['calibration_examples'] == 200
  assert checkpoints.load_spec(out).quantization['activations'] == 'static'
  image_dir, labels = test_images
  from_images = _classify(out, image_dir, str(tmp_path / 'images' / 'pred'))
  from_records = _classify(digits_int8_dir, image_dir, str(tmp_path / 'records' / 'pred'))
  acc = lambda rows: np.mean([rows[k]['label'] == labels[k] for k in labels])
  assert acc(from_images) >= acc(from_records) - 0.02
  assert np.mean([from_images[k]['label'] == from_records[k]['label'] for k in labels]) >= 0.95


def _corrupt(src, dst, edit_vars=None, edit_spec=None):
  spec, _ = checkpoints.load_spec(src), None
  stored = serialization.msgpack_restore(open(f'{src}/{checkpoints.MSGPACK_FILE}', 'rb').read())
  raw = json.loads(spec.to_json())
  if edit_vars:
    edit_vars(stored)
  if edit_spec:
    edit_spec(raw)
  os.makedirs(dst)
  with open(f'{dst}/{checkpoints.SPEC_FILE}', 'w') as f:
    json.dump(raw, f)
  with open(f'{dst}/{checkpoints.MSGPACK_FILE}', 'wb') as f:
    f.write(serialization.msgpack_serialize(stored))
  return dst


def _kernel(stored):
  return stored['params']['Dense_0']['kernel']['array']


@pytest.mark.parametrize(
  'case, edit_vars, edit_spec, message',
  [
    (
      'float_weights',
      lambda s: _kernel(s).update(qvalue=_kernel(s)['qvalue'].astype(np.float32)),
      None,
      r'variables\.msgpack: field "params/Dense_0/kernel/array/qvalue" is float32, expected int8',
    ),
    (
      'missing_scale',
      lambda s: _kernel(s).pop('scale'),
      None,
      r'variables\.msgpack: field "params/Dense_0/kernel/array/scale" is missing',
    ),
    (
      'scale_shape',
      lambda s: _kernel(s).update(scale=_kernel(s)['scale'][:, :3]),
      None,
      r'variables\.msgpack: field "params/Dense_0/kernel/array/scale" has shape \(1, 3\), expected \(1, 64\)',
    ),
    (
      'unknown_method',
      None,
      lambda raw: raw['quantization'].update(method='int3_magic'),
      r'spec\.json: field "quantization\.method" is \'int3_magic\'',
    ),
    (
      'float_dir_declared_int8',
      None,
      None,
      r'float_dir_declared_int8/variables\.msgpack: field "params/Conv_0/kernel" is a plain float32 array',
    ),
  ],
)
def test_handler_refuses_inconsistent_quantization(
  digits_int8_dir, digits_model_dir, tmp_path, case, edit_vars, edit_spec, message
):
  if case == 'float_dir_declared_int8':
    # A float model's variables under a spec that declares int8.
    spec, variables = checkpoints.load(digits_model_dir)
    qspec = checkpoints.load_spec(digits_int8_dir)
    checkpoints.save(str(tmp_path / case), qspec, variables, fmt='msgpack')
    bad = str(tmp_path / case)
  else:
    bad = _corrupt(digits_int8_dir, str(tmp_path / case), edit_vars, edit_spec)
  with pytest.raises(checkpoints.CheckpointError, match=message):
    JaxModelHandler(bad).load_model()


def _train(config, tmp_path, name, *overrides):
  from beam_dl.training import train_and_evaluate

  workdir = str(tmp_path / name)
  cfg = resolve_config(config, str(tmp_path / 'data'), list(overrides))
  return train_and_evaluate(cfg, workdir)


@pytest.fixture(scope='module')
def digits_teacher(tmp_path_factory):
  """SmallCNN trained by pipelines.train's trainer on the digits TFRecords."""
  tmp = tmp_path_factory.mktemp('teacher')
  return _train(DIGITS_CONFIG, tmp, 'float', 'num_steps=120', 'log_every=40', 'checkpoint_every=0')


def _first_batch_loss(cfg, variables):
  """Mean cross-entropy of `variables` on the first training batch `cfg`'s
  trainer draws (batch k depends only on the files and the seed)."""
  import optax

  from beam_dl.models import build
  from beam_dl.training import input_pipeline

  batch = next(
    input_pipeline.make_dataset(
      cfg.data, cfg.data.train_files, cfg.batch_size, train=True, seed=cfg.seed
    ).as_numpy_iterator()
  )
  x = batch['inputs'].astype(np.float32) * cfg.input_scale + cfg.input_offset
  logits = build(cfg.model, **cfg.model_kwargs).apply(variables, x)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean())


@pytest.mark.slow
def test_fine_tuning_starts_from_the_saved_params_and_lowers_the_loss(digits_teacher, tmp_path):
  import jax

  from beam_dl.models import build
  from beam_dl.training.state import example_inputs

  teacher_dir = digits_teacher['model_dir']
  summary = _train(
    DIGITS_CONFIG,
    tmp_path,
    'finetune',
    'num_steps=40',
    'log_every=1',
    'checkpoint_every=0',
    'eval_every=0',
    'learning_rate=1e-3',
    'warmup_steps=0',
    f'init_dir="{teacher_dir}"',
  )
  cfg = resolve_config(DIGITS_CONFIG, str(tmp_path / 'data'))
  _, saved = checkpoints.load(teacher_dir)
  fresh = build(cfg.model, **cfg.model_kwargs).init(jax.random.key(cfg.seed), *example_inputs(cfg))
  losses = [h['loss'] for h in summary['history']]
  # Step 1's loss is the saved model's loss on the same batch, not a fresh init's.
  assert losses[0] == pytest.approx(_first_batch_loss(cfg, saved), rel=1e-4)
  assert losses[0] < 0.25 * _first_batch_loss(cfg, fresh)
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  assert summary['eval']['accuracy'] >= digits_teacher['eval']['accuracy'] - 0.03


def test_init_dir_that_does_not_fit_is_refused(digits_model_dir, tmp_path):
  """digits_model_dir: SmallCNN 16/32/64 on inputs / 255; the digits config
  feeds inputs / 16 to a SmallCNN 32/64/128."""
  start = ('num_steps=1', f'init_dir="{digits_model_dir}"')
  with pytest.raises(ValueError, match=r'trained on inputs \* 0\.0039.*this config feeds inputs \* 0\.0625'):
    _train(DIGITS_CONFIG, tmp_path, 'scale', *start)
  with pytest.raises(
    ValueError, match=r"does not fit small_cnn.*\['Conv_0'\]\['bias'\] has shape \(16,\), expected \(8,\)"
  ):
    _train(DIGITS_CONFIG, tmp_path, 'shape', *start, f'input_scale={1 / 255!r}', 'model_kwargs.features=[8, 16]')


@pytest.mark.slow
def test_pruning_a_trained_model_keeps_its_accuracy_and_serves(digits_teacher, test_images, tmp_path):
  """Gradual magnitude pruning from the trained float model (init_dir): 80%
  of every kernel but the first convolution and the head (kept dense) gone by
  step 40 of 80, within a few points of the teacher."""
  summary = _train(
    DIGITS_CONFIG,
    tmp_path,
    'pruned',
    'num_steps=80',
    'log_every=20',
    'checkpoint_every=0',
    'eval_every=0',
    'learning_rate=1e-3',
    'warmup_steps=0',
    f'init_dir="{digits_teacher["model_dir"]}"',
    'compression.prune_sparsity=0.8',
    'compression.prune_end_step=40',
    'compression.prune_every=5',
    "compression.prune_exclude=('^Conv_0/', '^Dense_1/')",
  )
  report = summary['pruning']
  assert report['dense'] == ['Conv_0/kernel', 'Dense_1/kernel']
  assert min(report['layers'].values()) >= 0.79  # every pruned kernel, not just on average
  assert report['sparsity'] >= 0.75  # over all kernels, the dense ones included
  spec, variables = checkpoints.load(summary['model_dir'])
  assert pruning.sparsity_report(variables['params'])['sparsity'] == report['sparsity']
  assert spec.extra['metrics']['pruning']['sparsity'] == report['sparsity']
  assert summary['eval']['accuracy'] >= digits_teacher['eval']['accuracy'] - 0.05
  # Served by the unchanged pipeline (this model was trained on 0..16 pixels,
  # so only that every image is answered is checked here).
  image_dir, labels = test_images
  rows = _classify(summary['model_dir'], image_dir, str(tmp_path / 'out' / 'pred'))
  assert len(rows) == len(labels)


@pytest.mark.slow
def test_distillation_student_learns_from_teacher_outputs(digits_teacher, tmp_path):
  """weight=1: the labels are ignored, so every bit the student learns about
  the digits comes through the teacher's softened outputs."""
  student = ('model_kwargs={"num_classes": 10, "features": [8, 16], "hidden": 32}',)
  summary = _train(
    DIGITS_CONFIG,
    tmp_path,
    'student',
    'num_steps=120',
    'log_every=20',
    'checkpoint_every=0',
    *student,
    f'compression.teacher_dir={digits_teacher["model_dir"]}',
    'compression.distill_weight=1.0',
    'compression.distill_temperature=4.0',
  )
  losses = [h['loss'] for h in summary['history']]
  assert losses[-1] < 0.5 * losses[0]
  assert summary['eval']['accuracy'] >= 0.7
  teacher_bytes = compress.dir_bytes(digits_teacher['model_dir'])
  assert compress.dir_bytes(summary['model_dir']) * 3 <= teacher_bytes


@pytest.mark.slow
def test_quantization_aware_training_exports_int8_dir(digits_teacher, tmp_path):
  """QAT fine-tunes the trained float model (init_dir) under fake int8."""
  summary = _train(
    DIGITS_CONFIG,
    tmp_path,
    'qat',
    'num_steps=30',
    'log_every=1',
    'checkpoint_every=0',
    'learning_rate=1e-3',
    'warmup_steps=0',
    f'init_dir="{digits_teacher["model_dir"]}"',
    'compression.qat="int8"',
  )
  assert summary['history'][0]['loss'] < 0.5  # started trained: a fresh init's is ~2.3
  assert summary['eval']['accuracy'] >= digits_teacher['eval']['accuracy'] - 0.03
  qdir = summary['quantized_model_dir']
  spec, variables = checkpoints.load(qdir)
  assert spec.quantization['method'] == 'qwix_ptq'
  x_test = np.zeros((3, 8, 8, 1), np.uint8)
  assert JaxModelHandler(qdir).load_model().predict(list(x_test)).shape == (3, 10)


@pytest.fixture(scope='module')
def co2_float(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('co2')
  return _train(CO2_CONFIG, tmp, 'float', 'num_steps=80', 'log_every=40', 'checkpoint_every=0')


@pytest.mark.slow
def test_lstm_int8_weights_serve_close_to_float(co2_float, tmp_path):
  from beam_dl.compression import calibration

  out = str(tmp_path / 'int8')
  summary = compress.main(['--model_dir', co2_float['model_dir'], '--output', out])
  assert summary['quantization']['method'] == 'weight_only'  # qwix PTQ cannot wrap nn.scan
  spec, _ = checkpoints.load(out)
  cfg, pattern, _ = calibration.data_config(spec)
  ((x, mask),) = calibration.calibration_batches(cfg, cfg.eval_files, 64)
  examples = [xi[m] for xi, m in zip(x, mask)]
  f = JaxModelHandler(co2_float['model_dir']).load_model().predict(examples)
  q = JaxModelHandler(out).load_model().predict(examples)
  assert np.max(np.abs(f - q)) <= 0.02 * np.max(np.abs(f)) + 1e-3


@pytest.mark.slow
def test_lstm_pruning_and_distillation(co2_float, tmp_path):
  pruned = _train(
    CO2_CONFIG,
    tmp_path,
    'pruned',
    'num_steps=80',
    'log_every=40',
    'checkpoint_every=0',
    'compression.prune_sparsity=0.5',
    'compression.prune_end_step=60',
    'compression.prune_every=5',
  )
  assert pruned['pruning']['sparsity'] >= 0.49
  student = _train(
    CO2_CONFIG,
    tmp_path,
    'student',
    'num_steps=80',
    'log_every=10',
    'checkpoint_every=0',
    'model_kwargs.hidden_size=8',
    f'compression.teacher_dir={co2_float["model_dir"]}',
    'compression.distill_weight=0.7',
  )
  losses = [h['loss'] for h in student['history']]
  assert losses[-1] < losses[0]
  assert student['eval']['skill_vs_zero'] > 0.0


def test_magnitude_pruning_schedule_is_cubic_and_monotone():
  import jax
  import jax.numpy as jnp
  import optax

  schedule = pruning.sparsity_schedule(0.9, 10, 110)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == 0.0
  assert abs(float(schedule(60)) - 0.9 * (1 - 0.5**3)) < 1e-6
  assert abs(float(schedule(200)) - 0.9) < 1e-6
  tx = optax.chain(optax.sgd(0.1), pruning.magnitude_pruning(0.75, 0, 4, every=1))
  params = {'kernel': jnp.arange(1.0, 17.0).reshape(4, 4), 'bias': jnp.ones(4)}
  state = tx.init(params)
  zeros = []
  for _ in range(6):
    updates, state = tx.update({k: jnp.zeros_like(v) for k, v in params.items()}, state, params)
    params = optax.apply_updates(params, updates)
    zeros.append(int(jnp.sum(params['kernel'] == 0)))
  assert zeros == sorted(zeros) and zeros[-1] == 12  # 75% of 16, smallest first
  assert np.all(np.asarray(params['kernel']).ravel()[-4:] == [13, 14, 15, 16])
  assert np.all(np.asarray(params['bias']) == 1)
  # Excluded kernels stay dense; the report counts them and names them.
  tx = optax.chain(optax.sgd(0.1), pruning.magnitude_pruning(0.75, 0, 4, every=1, exclude=('^head/',)))
  params = {'conv': {'kernel': jnp.arange(1.0, 17.0).reshape(4, 4)}, 'head': {'kernel': jnp.ones((4, 4))}}
  state = tx.init(params)
  for _ in range(6):
    updates, state = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  report = pruning.sparsity_report(params, exclude=('^head/',))
  assert report['layers'] == {'conv/kernel': 0.75} and report['dense'] == ['head/kernel']
  assert report['sparsity'] == 0.375  # 12 of the 32 kernel weights


def test_quantize_refuses_bad_arguments(digits_model_dir):
  spec, variables = checkpoints.load(digits_model_dir)
  with pytest.raises(ValueError, match='calibration examples'):
    quantize.quantize(spec, variables, activations='static', calibration=[])
  qspec, qvars = quantize.quantize(spec, variables, activations='dynamic')
  with pytest.raises(ValueError, match='already quantized'):
    quantize.quantize(qspec, qvars)


def test_mixup_blends_pairs_and_keeps_sequences_with_other_masks_whole():
  from beam_dl.compression import distill

  images = {'inputs': np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2), 'label': np.arange(4)}
  mixed = distill.mixup(images, 1.0, np.random.default_rng(0))
  again = distill.mixup(images, 1.0, np.random.default_rng(0))
  np.testing.assert_array_equal(mixed['inputs'], again['inputs'])  # a function of the rng only
  x = images['inputs'].astype(np.float32)
  rng = np.random.default_rng(0)  # the same draws: a partner and a Beta(1, 1) lambda per example
  partner, lam = rng.permutation(4), rng.beta(1.0, 1.0, size=4)[:, None, None]
  np.testing.assert_allclose(mixed['inputs'], lam * x + (1 - lam) * x[partner], rtol=1e-6)
  assert not np.allclose(mixed['inputs'], x)
  np.testing.assert_array_equal(mixed['label'], images['label'])
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], bool)
  seqs = {'inputs': np.random.default_rng(1).normal(size=(4, 3, 1)).astype(np.float32), 'mask': mask}
  for seed in range(20):
    out = distill.mixup(seqs, 1.0, np.random.default_rng(seed))['inputs']
    # rows 1 and 2 have no partner with their mask: they can only be themselves
    np.testing.assert_allclose(out[1:3], seqs['inputs'][1:3], rtol=1e-6)


def test_distill_mixup_needs_the_soft_loss_only(digits_model_dir, tmp_path):
  with pytest.raises(ValueError, match='distill_mixup needs distill_weight=1'):
    _train(
      DIGITS_CONFIG,
      tmp_path,
      'mix',
      'num_steps=1',
      f'compression.teacher_dir="{digits_model_dir}"',
      'compression.distill_mixup=1.0',
      'compression.distill_weight=0.5',
    )
