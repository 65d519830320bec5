"""Reading and writing bytes where they live: files (`files`), TFRecord
framing (`tfrecord`), Kafka (`kafka`). Formats live in `beam_dl.formats`,
decoders beside them (`beam_dl.decoding.images`, `beam_dl.decoding.sequences`)."""
