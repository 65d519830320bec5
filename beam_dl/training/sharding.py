"""Meshes, logical->mesh shardings, and multi-host start-up.

The models annotate parameters with logical axis names only. Here those
names become `NamedSharding`s on a `Mesh` with axes ('data', 'model'), using
the rules from `ShardingConfig`. A mesh axis that does not divide an array
dimension is dropped for that array (the dimension is replicated), so small
heads (10 classes on 8 devices) never fail to shard.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from beam_dl.core.partitioning import fit_spec
from beam_dl.training.config import ShardingConfig

log = logging.getLogger(__name__)

DATA, MODEL = 'data', 'model'


# Seconds a process waits for a peer that stopped answering (killed, hung)
# before it ends with an error instead of blocking forever in a collective,
# and at most at the shutdown barrier; JAX_DISTRIBUTED_TIMEOUT_S overrides it.
DEFAULT_DISTRIBUTED_TIMEOUT_S = 60


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment is a cluster.

  A cluster is recognised by JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES
  and JAX_PROCESS_ID), or by a multi-task SLURM / Open MPI job or a
  multi-host TPU slice (TPU_WORKER_HOSTNAMES), which jax auto-detects;
  JAX_DISTRIBUTED=1 asks for auto-detection elsewhere. CPU collectives go through gloo (the CPU backend has no other
  cross-process implementation). A peer silent for JAX_DISTRIBUTED_TIMEOUT_S
  seconds ends every process with an error rather than a hang. Returns True
  when this process is (now or already) part of a multi-process run.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  timeout = int(env.get('JAX_DISTRIBUTED_TIMEOUT_S', DEFAULT_DISTRIBUTED_TIMEOUT_S))
  kwargs = dict(
    heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout, initialization_timeout=max(timeout, 60)
  )
  if env.get('JAX_COORDINATOR_ADDRESS'):
    kwargs.update(
      coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
      num_processes=int(env['JAX_NUM_PROCESSES']),
      process_id=int(env['JAX_PROCESS_ID']),
    )
  elif not (
    int(env.get('SLURM_NTASKS', '1')) > 1
    or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
    or ',' in env.get('TPU_WORKER_HOSTNAMES', '')
    or env.get('JAX_DISTRIBUTED') == '1'
  ):
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  log.info(
    'jax.distributed: process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def make_mesh(config: ShardingConfig, devices=None) -> Mesh:
  """A ('data', 'model') mesh over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  mp = config.model_parallelism
  if len(devices) % mp:
    hint = (
      f'; on CPU, split the host into devices with `pipelines.train --cpu_devices {mp}` '
      f'(XLA_FLAGS=--xla_force_host_platform_device_count={mp})'
      if devices[0].platform == 'cpu'
      else ''
    )
    raise ValueError(
      f'sharding.model_parallelism={mp} needs a multiple of {mp} devices, '
      f'found {len(devices)} {devices[0].platform} device(s){hint}'
    )
  # Auto axes: XLA propagates shardings from the annotated params and batch
  # (jax 0.10 defaults make_mesh to Explicit axes, which need per-op specs).
  return jax.make_mesh(
    (len(devices) // mp, mp),
    (DATA, MODEL),
    (AxisType.Auto, AxisType.Auto),
    devices=devices,
  )


def logical_to_shardings(logical_specs: Any, abstract: Any, mesh: Mesh, rules) -> Any:
  """Tree of logical PartitionSpecs + abstract arrays -> tree of NamedSharding."""

  def one(spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else P()
    return NamedSharding(mesh, fit_spec(mesh_spec, np.shape(leaf), mesh))

  return jax.tree_util.tree_map(one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: leading (example) axis split over 'data', rest replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays split over 'data'.

  Each process passes only its own examples (its input-file shard);
  `make_array_from_process_local_data` assembles the global batch.
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def describe(shardings: Any, abstract: Any) -> dict[str, tuple]:
  """{'path': per-device shard shape} for logs and tests."""
  out = {}
  for (path, s), leaf in zip(
    jax.tree_util.tree_leaves_with_path(shardings),
    jax.tree_util.tree_leaves(abstract),
  ):
    out[jax.tree_util.keystr(path)] = tuple(s.shard_shape(np.shape(leaf)))
  return out
