"""Demo: forecast-based anomaly scoring of the Mauna Loa CO2 series.

    python -m pipelines.score_sequences_demo --workdir /tmp/co2_demo [--cell gru] [--pooling attention] \
        [--runner FnApiRunner ...any Beam option]

Real data that ships with statsmodels (weekly atmospheric CO2, 1958-2001,
2284 readings, 59 of them missing), nothing downloaded:

1. writes the series as JSON-lines events {"key", "time", "co2"}: missing
   readings as null, plus two truncated lines, so the dead-letter path runs
   on real input; three readings are shifted by +8 ppm (the anomalies to find);
2. trains a small Flax LSTM (`rnn`) to predict a week's reading from the 11
   before it, on the clean series (`beam_dl.training.quick.fit_arrays`), and
   saves it with `beam_dl.models.checkpoints.save`;
3. runs `pipelines.score_sequences` in batch with 12-week sliding windows
   (one-week step): each window's last reading is forecast from the others
   and scored by the absolute error;
4. prints counts, the top scores and whether they are the injected anomalies.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from beam_dl.formats.jsonl import read_jsonl
from beam_dl.models import checkpoints
from beam_dl.models.checkpoints import ModelSpec

WEEK = 7 * 24 * 3600.0
SEQ_LEN = 12
MIN_LENGTH = 8  # windows with fewer readings are dead letters, not scored
ANOMALY_INDICES = (600, 1200, 1800)
ANOMALY_PPM = 8.0
KEY = 'mauna_loa'


def load_series() -> tuple[np.ndarray, np.ndarray]:
  """(event times in epoch seconds, CO2 ppm with NaN for missing weeks)."""
  import statsmodels.api as sm  # pylint: disable=g-import-not-at-top

  data = sm.datasets.co2.load_pandas().data
  times = (data.index.values.astype('datetime64[s]').astype(np.int64)).astype(np.float64)
  return times, data['co2'].to_numpy(np.float64)


def write_events(path: str, times: np.ndarray, values: np.ndarray) -> dict:
  """The series as JSON lines with anomalies and malformed lines; returns counts."""
  values = values.copy()
  for i in ANOMALY_INDICES:
    values[i] += ANOMALY_PPM
  with open(path, 'w', encoding='utf-8') as f:
    for t, v in zip(times, values):
      f.write(json.dumps({'key': KEY, 'time': t, 'co2': None if np.isnan(v) else round(float(v), 2)}) + '\n')
    f.write('{"key": "mauna_loa", "time": 1.0e9, "co2": 3\n')  # truncated lines
    f.write('{"key": "mauna_loa", "ti\n')
  return {'events': len(times), 'missing': int(np.isnan(values).sum()), 'malformed': 2}


def training_windows(values: np.ndarray, seed: int = 0) -> tuple[np.ndarray, ...]:
  """Runs of SEQ_LEN consecutive readings without gaps -> (x [N, 11, 1], mask [N, 11], y [N, 1]).

  Each window keeps a random number (MIN_LENGTH - 1 .. 11) of its latest
  inputs, the rest masked out, as the pipeline sees windows with missing
  weeks and at the ends of the series.
  """
  windows = np.lib.stride_tricks.sliding_window_view(values, SEQ_LEN)
  windows = windows[~np.isnan(windows).any(axis=1)]
  x, y = windows[:, :-1], windows[:, -1:]
  keep = np.random.default_rng(seed).integers(MIN_LENGTH - 1, SEQ_LEN, size=len(x))
  x = np.stack(
    [np.roll(np.where(np.arange(SEQ_LEN - 1) >= SEQ_LEN - 1 - k, row, 0.0), k - SEQ_LEN + 1) for row, k in zip(x, keep)]
  )  # the latest k inputs first, then padding
  mask = np.arange(SEQ_LEN - 1)[None, :] < keep[:, None]
  return x[..., None].astype(np.float32), mask, y.astype(np.float32)


def train_model(
  model_dir: str, values: np.ndarray, steps: int = 400, seed: int = 0, cell: str = 'lstm', pooling: str = 'last'
) -> dict:
  """Trains and saves the forecaster ('rnn': cell lstm|gru, pooling last|mean|attention)."""
  from beam_dl.training.quick import fit_arrays  # pylint: disable=g-import-not-at-top

  x, mask, y = training_windows(values, seed)
  mean, std = float(np.nanmean(values)), float(np.nanstd(values))
  spec = ModelSpec(
    name='rnn',
    kwargs={'cell': cell, 'hidden_size': 32, 'pooling': pooling, 'num_outputs': 1, 'head': 'regression'},
    input_shape=(None, 1),
    input_dtype='float32',
    input_scale=1.0 / std,
    input_offset=-mean / std,
    task='regression',
    extra={'target_scale': std, 'target_offset': mean, 'series': 'statsmodels co2', 'steps': steps},
  )
  variables, losses = fit_arrays(
    spec, (x, mask), (y - mean) / std, loss='mse', steps=steps, batch_size=128, learning_rate=3e-3, seed=seed
  )
  checkpoints.save(model_dir, spec, variables, fmt='msgpack')
  return {'windows': len(x), 'first_loss': losses[0], 'final_loss': float(np.mean(losses[-20:]))}


def main(argv=None):
  from beam_dl import cli  # pylint: disable=g-import-not-at-top
  from beam_dl.cli.options import positive_int  # pylint: disable=g-import-not-at-top

  parser = cli.ArgumentParser(
    prog='python -m pipelines.score_sequences_demo', description=__doc__.splitlines()[0], epilog=cli.BEAM_OPTIONS_NOTE
  )
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--train_steps', type=positive_int, default=400)
  parser.add_argument('--cell', choices=['lstm', 'gru'], default='lstm')
  parser.add_argument('--pooling', choices=['last', 'mean', 'attention'], default='last')
  args, beam_args = parser.parse_known_args(argv)
  cli.check_known_flags(beam_args)  # before training, not after
  cli.require_writable(args.workdir, 'workdir', directory=True)
  times, values = load_series()
  events_path = os.path.join(args.workdir, 'co2_events.jsonl')
  counts = write_events(events_path, times, values)
  print(
    f'wrote {counts["events"]} events ({counts["missing"]} missing readings, '
    f'{counts["malformed"]} malformed lines) to {events_path}'
  )
  model_dir = os.path.join(args.workdir, 'model')
  fit = train_model(model_dir, values, steps=args.train_steps, cell=args.cell, pooling=args.pooling)
  print(
    f'trained {args.cell.upper()} forecaster ({args.pooling} pooling) on {fit["windows"]} windows: mse {fit["first_loss"]:.3f} -> '
    f'{fit["final_loss"]:.4f} (normalised units)'
  )

  from pipelines import score_sequences  # pylint: disable=g-import-not-at-top

  output = os.path.join(args.workdir, 'scores')
  score_sequences.run(
    [
      '--input',
      events_path,
      '--model_dir',
      model_dir,
      '--output',
      output,
      '--event_value_fields',
      'co2',
      '--window',
      'sliding',
      '--window_size',
      str(SEQ_LEN * WEEK),
      '--window_period',
      str(WEEK),
      '--seq_len',
      str(SEQ_LEN),
      '--min_length',
      str(MIN_LENGTH),
      '--forecast',
      *beam_args,
    ]
  )
  scores = read_jsonl(f'{output}-0*.jsonl')
  failed = read_jsonl(f'{output}_failed-*.jsonl')
  by_stage: dict[str, int] = {}
  for record in failed:
    by_stage[record['stage']] = by_stage.get(record['stage'], 0) + 1
  print(f'scored {len(scores)} windows; dead letters by stage: {by_stage}')
  errors = np.array([s['score'] for s in scores])
  print(f'forecast error (ppm): median {np.median(errors):.3f}, p99 {np.percentile(errors, 99):.3f}')
  anomaly_times = {float(times[i]) for i in ANOMALY_INDICES}
  top = sorted(scores, key=lambda s: -s['score'])[:5]
  for s in top:
    when = np.datetime64(int(s['last_time']), 's').astype('datetime64[D]')
    flag = '  <- injected anomaly' if s['last_time'] in anomaly_times else ''
    print(
      f'  score {s["score"]:6.2f} ppm  week of {when}  window end '
      f'{np.datetime64(int(s["window_end"]), "s").astype("datetime64[D]")}{flag}'
    )
  ranked = [s['last_time'] for s in sorted(scores, key=lambda s: -s['score'])]
  ranks = sorted(ranked.index(t) + 1 for t in anomaly_times if t in ranked)
  found = ranks == list(range(1, len(ANOMALY_INDICES) + 1))
  print(f'ranks of the {len(ANOMALY_INDICES)} injected anomalies among {len(scores)} windows: {ranks}')
  return {'scores': scores, 'failed': failed, 'found_anomalies': found, 'fit': fit}


if __name__ == '__main__':
  from beam_dl import cli  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.WARNING)
  cli.main(main, 'score_sequences_demo', logs=False)
