"""Flink's flat config.yaml, written for the Flink a Beam job server embeds or a cluster of
beam_dl.services runs (beam_dl.services.flink_cluster, beam_dl.services.kafka_io)."""

from __future__ import annotations

import json
import os


def write_config(conf_dir: str, config: dict[str, object]) -> None:
  os.makedirs(conf_dir, exist_ok=True)
  with open(os.path.join(conf_dir, 'config.yaml'), 'w', encoding='utf-8') as f:
    for key, value in config.items():
      f.write(f'{key}: {json.dumps(value) if isinstance(value, str) else value}\n')


def local_config_dir(conf_dir: str, bind_host: str = '127.0.0.1', buffer_timeout_ms: int | None = None) -> str:
  """A `--flink-conf-dir` for Beam's job server with `--flink-master [local]`:
  the Flink it embeds (a MiniCluster per job) binds its BLOB server, REST
  endpoint and RPC to bind_host; without it they listen on all interfaces.

  buffer_timeout_ms: how long a network buffer between two Flink tasks may
  wait to fill before it is sent (Flink's `execution.buffer-timeout`,
  default 100 ms). Each keyed exchange of a streaming job (the late-data
  gate's, the GroupByKey's) can hold an element that long at low rates.
  """
  config = {'jobmanager.bind-host': bind_host, 'taskmanager.bind-host': bind_host, 'rest.bind-address': bind_host}
  if buffer_timeout_ms is not None:
    config['execution.buffer-timeout.interval'] = f'{buffer_timeout_ms} ms'
  write_config(conf_dir, config)
  return conf_dir
