"""transforms.io.WriteJsonLines: replacing old shards never deletes a neighbour's files."""

import json

import apache_beam as beam

from transforms.io import WriteJsonLines


def test_writing_outputs_keeps_the_dead_letters_beside_them(tmp_path):
  """A neighbour that Beam's own stale-shard glob `<p>-*-of-00001.jsonl` matches,
  `<p>-late-00000-of-00001.jsonl` (written by another step of the same job,
  finalized first as Prism may do), survives `<p>`'s write, which does
  replace its own stale shard."""
  prefix = str(tmp_path / 'predictions')
  dead_letters = tmp_path / 'predictions-late-00000-of-00001.jsonl'
  dead_letters.write_text('{"key": "a.png", "reason": "bad", "stage": "decode"}\n')
  (tmp_path / 'predictions-00000-of-00001.jsonl').write_text('{"stale": true}\n')
  with beam.Pipeline('DirectRunner') as p:
    _ = p | beam.Create([{'key': 'b.png', 'label': 3}]) | WriteJsonLines(prefix, num_shards=1)
  assert dead_letters.read_text() == '{"key": "a.png", "reason": "bad", "stage": "decode"}\n'
  lines = (tmp_path / 'predictions-00000-of-00001.jsonl').read_text().splitlines()
  assert [json.loads(line) for line in lines] == [{'key': 'b.png', 'label': 3}]
