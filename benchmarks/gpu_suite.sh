#!/usr/bin/env bash
# One prepared accelerator check (issue 15), meant to fit in 8 minutes on an H100/H200:
#   1. ResNet-50 bf16 through RunInference vs the raw jitted loop (bench_inference)
#   2. ResNet-50 training images/s through the trainer's sharded train step
#      (beam_dl.training.strategies, synthetic batch resident on the device:
#      the device machine has no TensorFlow, so no tf.data input here)
#   3. the flagship pipeline (classify_images) on the GPU vs its plain loop
#
#   bash benchmarks/gpu_suite.sh                      # on the GPU machine
#   GPU_SUITE_TINY=1 bash benchmarks/gpu_suite.sh     # CPU, tiny sizes: checks the script
#
# The GPU machine has jax[cuda], flax, optax, orbax, numpy, pillow but no
# apache-beam: `make gpu-wheels` fills the ignored .whl/ here, the run carries
# it, and this script installs it into /tmp/site (no index, no deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import apache_beam' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no apache_beam and no .whl/: run 'make gpu-wheels' first" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${GPU_SUITE_TINY:-0}" == 1 ]]; then
  DEVICE=cpu; INFER_MODEL=resnet_tiny; INFER_NUM=512; INFER_BATCH=64; DTYPE=float32
  TRAIN_MODEL=resnet_tiny; TRAIN_SIZE=32; TRAIN_BATCH=32; TRAIN_STEPS=3; FLAGSHIP_NUM=1200
else
  DEVICE=gpu; INFER_MODEL=resnet50; INFER_NUM=16384; INFER_BATCH=256; DTYPE=bfloat16
  TRAIN_MODEL=resnet50; TRAIN_SIZE=224; TRAIN_BATCH=256; TRAIN_STEPS=30; FLAGSHIP_NUM=48000
fi
"$PY" -c 'import jax; print("devices:", jax.devices())'

echo "== 1. $INFER_MODEL $DTYPE: RunInference vs raw jitted loop"
timeout 200 "$PY" -m benchmarks.bench_inference --model "$INFER_MODEL" --batch "$INFER_BATCH" \
  --num "$INFER_NUM" --dtype "$DTYPE" --device "$DEVICE" --repeats 1 || echo "inference benchmark failed: $?"

echo "== 2. $TRAIN_MODEL $DTYPE training step images/s (batch $TRAIN_BATCH, ${TRAIN_SIZE}px)"
timeout 150 "$PY" - "$TRAIN_MODEL" "$TRAIN_SIZE" "$TRAIN_BATCH" "$TRAIN_STEPS" "$DTYPE" <<'PYEOF' || echo "training benchmark failed: $?"
import sys, time
import jax
import numpy as np
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig
from beam_dl.training.strategies import make_strategy

model, size, batch, steps, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
shape = (size, size, 3)
cfg = TrainConfig(
    model=model, model_kwargs={'num_classes': 1000, 'dtype': dtype}, input_scale=1 / 255,
    data=DataConfig(kind='images', train_files='unused', eval_files='unused', shape=shape),
    batch_size=batch, num_steps=10**9, optimizer='sgd', learning_rate=0.1, label_smoothing=0.1,
    sharding=ShardingConfig(mode='dp'))
strategy = make_strategy(cfg)
rng = np.random.default_rng(0)
host = {'inputs': rng.integers(0, 256, (batch, *shape), np.uint8),
        'label': rng.integers(0, 1000, batch).astype(np.int32), 'weight': np.ones(batch, np.float32)}
state = strategy.create_state()
data = strategy.put(host)
t0 = time.perf_counter()
state, metrics = strategy.train_step(state, data)
jax.block_until_ready(metrics)
compile_s = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(steps):
  state, metrics = strategy.train_step(state, data)
jax.block_until_ready((state, metrics))
seconds = time.perf_counter() - t0
dev = jax.devices()[0]
print(f'train step: {model} {dtype} {size}x{size} batch {batch} on {len(jax.devices())} x {dev.platform} '
      f'({dev.device_kind}): {steps * batch / seconds:,.0f} images/s ({steps} steps, compile {compile_s:.1f} s)')
PYEOF

echo "== 3. flagship classify_images on $DEVICE vs its plain loop"
timeout 200 "$PY" -m benchmarks.bench_flagship --num "$FLAGSHIP_NUM" --modes single \
  --extra="--device=$DEVICE" || echo "flagship benchmark failed: $?"
