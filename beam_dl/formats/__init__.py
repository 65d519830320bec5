"""beam_dl's on-disk record formats: one module per format, used by every side.

  image_example     tf.train.Example of one image: decoded pixels (`image/raw`,
                    `image/shape`, `label`, `key`: what beam_dl writes and trains
                    on) or an encoded file (`image/encoded`, `image/key`,
                    `image/class/label`: what other tools write)
  sequence_example  tf.train.SequenceExample of one sequence (context `key`,
                    `label`/`target`; feature lists `values`, `ids`), and its
                    flat list-feature tf.train.Example variant
  events            event records as JSON lines or CSV rows (`EventSpec`,
                    `parse_json_event`, `parse_csv_event`) and their per-key
                    assembly into sequences
  features          tf.train.Feature builders and value checks the formats share

Each format module holds its feature names, its encoder (numpy -> serialized
bytes), its Beam-side parsers (bytes -> numpy) and its tf.data side (the
tf.io feature spec and parse function). Beam writers (`transforms.tfrecords`),
readers (`transforms.images`, `transforms.sequences`), the training input
pipeline and the tf.Transform canonical records all import them, so a feature
name or layout is written down once.
"""
