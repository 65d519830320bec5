"""Test-wide settings.

Eight fake CPU devices so sharding tests (mesh, NamedSharding, shard_map, pmap)
run on a laptop or CI; set before anything imports jax, as Flax's own tests do.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
