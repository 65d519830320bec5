"""Export a beam_dl model directory to a TF SavedModel (jax2tf) and check it.

    python -m pipelines.export_savedmodel --model_dir demo_out/model --export_dir demo_out/saved_model

Writes the SavedModel (signature `serving_default`: inputs -> {'outputs'}),
then feeds the same random inputs of the model's shape and dtype to JAX and to
the SavedModel, at two batch sizes (the batch dimension is polymorphic), and
fails if the outputs differ by more than --tolerance.
"""

from __future__ import annotations

import logging
import sys

from beam_dl import cli
from beam_dl.models import checkpoints
from beam_dl.serving import savedmodel_export as export


def main(argv=None) -> float:
  parser = cli.ArgumentParser(prog='python -m pipelines.export_savedmodel', description=__doc__.splitlines()[0])
  parser.add_argument('--model_dir', required=True, help='A beam_dl model directory (spec.json + variables).')
  parser.add_argument('--export_dir', required=True, help='Where the SavedModel goes.')
  parser.add_argument('--tolerance', type=float, default=1e-4, help='Largest allowed |TF - JAX| output difference.')
  args = parser.parse_args(argv)
  checkpoints.load(args.model_dir)  # a model that won't load: one line, before TensorFlow starts
  cli.require_writable(args.export_dir, 'export_dir', directory=True)
  export.export_saved_model(args.model_dir, args.export_dir)
  spec = checkpoints.load_spec(args.model_dir)
  worst = max(
    export.compare(args.model_dir, args.export_dir, export.example_inputs(spec, batch_size=n, seed=n)) for n in (1, 5)
  )
  print(f'exported {args.model_dir} -> {args.export_dir}; max |SavedModel - JAX| = {worst:.3g}')
  if worst > args.tolerance:
    print(
      f'export_savedmodel: error: export differs from JAX by {worst:.3g} > --tolerance {args.tolerance}',
      file=sys.stderr,
    )
    raise SystemExit(1)
  return worst


if __name__ == '__main__':
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  cli.main(main, 'export_savedmodel', logs=False)
