"""One process of the data-split check, run as `python -m tests.multihost_data OUT PATTERN STEPS BATCH`.

Each process streams its own training batches from PATTERN (images whose
first two pixels encode the example's number), assembles the global batch
with `sharding.shard_batch` (`jax.make_array_from_process_local_data`),
gathers it back to every host, and process 0 writes the example numbers of
each global step, in row order, to OUT as JSON, with what the pmap strategy
said in a multi-process run.
"""

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from beam_dl.training import input_pipeline, sharding, strategies
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig


def main(out: str, pattern: str, steps: int, global_batch: int) -> None:
  assert sharding.maybe_initialize_distributed(), 'not started as one of several processes'
  cfg = DataConfig(kind='images', train_files=pattern, shape=(8, 8, 1), shuffle_buffer=1000)
  mesh = sharding.make_mesh(ShardingConfig(mode='dp'))
  local = global_batch // jax.process_count()
  batches = input_pipeline.make_dataset(cfg, pattern, local, train=True, seed=1).as_numpy_iterator()
  seen = []
  for _ in range(steps):
    batch = sharding.shard_batch(next(batches), mesh)
    assert batch['inputs'].shape[0] == global_batch, batch['inputs'].shape
    pixels = multihost_utils.process_allgather(batch['inputs'], tiled=True)
    seen.append([int(p[0, 0, 0]) * 256 + int(p[0, 1, 0]) for p in np.asarray(pixels)])
  try:
    strategies.make_strategy(TrainConfig(model='small_cnn', sharding=ShardingConfig(mode='pmap')))
    pmap = 'accepted'
  except ValueError as e:
    pmap = str(e)
  if jax.process_index() == 0:
    with open(out, 'w') as f:
      json.dump({'steps': seen, 'processes': jax.process_count(), 'devices': jax.device_count(), 'pmap': pmap}, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
