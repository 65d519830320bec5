"""classify_images on hdfs:// through Beam's Hadoop filesystem, against a real HDFS.

The fixture starts a one-node HDFS (NameNode + DataNode from Maven Central's
hadoop-client-minicluster, `make hdfs`) on 127.0.0.1; Beam reaches it over
WebHDFS with --hdfs_host/--hdfs_port/--hdfs_user. Image files, a TFRecord
file and a msgpack model directory are written to it, the pipeline reads
them from hdfs:// and writes predictions and dead letters back, and the
test reads those back from HDFS and compares them with the model's own
predictions on the same bytes.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_dl.decoding.images import ImageSpec, decode_image
from beam_dl.formats.image_example import encode_file_example
from beam_dl.models import checkpoints
from beam_dl.services.process import is_loopback, listening_sockets
from beam_dl.serving.handler import JaxModelHandler
from pipelines import classify_images
from tests import services
from tests.imaging import TEXT_NAMED_JPG, digits_uint8, encode

pytestmark = [
  pytest.mark.slow,  # a JVM cluster start
  pytest.mark.skipif(not services.hadoop_jars(), reason='no Hadoop jars in .cache/hadoop/lib: run `make hdfs`'),
]
GRAY = ImageSpec(8, 8, channels=1)


@pytest.fixture(scope='module')
def hdfs(tmp_path_factory):
  with services.hdfs_cluster(str(tmp_path_factory.mktemp('hdfs'))) as cluster:
    FileSystems.set_options(PipelineOptions(cluster.beam_args))
    yield cluster


@pytest.fixture(scope='module')
def images():
  """{name: PNG bytes} of eight real digits."""
  pixels, _ = digits_uint8()
  return {f'{i}.png': encode(image, 'PNG') for i, image in enumerate(pixels[-8:])}


def put(path: str, data: bytes):
  with FileSystems.create(path) as f:
    f.write(data)


def read_hdfs_jsonl(pattern: str) -> list[dict]:
  """Records of the JSON-lines files on HDFS matching `pattern`."""
  paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
  records = []
  for path in paths:
    with FileSystems.open(path) as f:
      records.extend(json.loads(line) for line in f.read().decode('utf-8').splitlines() if line.strip())
  return records


def expected_labels(model_dir, images):
  model = JaxModelHandler(model_dir).load_model()
  names = sorted(images)
  outputs = model.predict([decode_image(images[n], GRAY) for n in names])
  return {n: int(np.argmax(o)) for n, o in zip(names, outputs)}


def test_hdfs_listens_on_loopback_only(hdfs):
  """NameNode RPC and HTTP, DataNode data, IPC and HTTP: every port on 127.0.0.1."""
  listening = listening_sockets([hdfs.pid])
  assert {hdfs.http_port, hdfs.namenode_port} <= {port for _, _, port in listening}, listening
  assert all(is_loopback(address) for _, address, _ in listening), listening


def test_image_files_from_hdfs_predictions_back_to_hdfs(hdfs, images, digits_model_dir):
  for name, data in {**images, 'text.jpg': TEXT_NAMED_JPG}.items():
    put(f'hdfs://data/files/{name}', data)
  classify_images.run([
      '--input=hdfs://data/files/*', f'--model_dir={digits_model_dir}', '--output=hdfs://out/files/pred',
      *hdfs.beam_args,
  ])  # fmt: skip
  predictions = read_hdfs_jsonl('hdfs://out/files/pred-[0-9]*.jsonl')
  failed = read_hdfs_jsonl('hdfs://out/files/pred_failed-*.jsonl')
  assert {r['key'].rsplit('/', 1)[1]: r['label'] for r in predictions} == expected_labels(digits_model_dir, images)
  assert [(r['key'].rsplit('/', 1)[1], r['stage']) for r in failed] == [('text.jpg', 'decode')]
  assert all(r['key'].startswith('hdfs://data/files/') for r in predictions + failed)


def test_tfrecords_and_model_from_hdfs(hdfs, images, digits_model_dir):
  """TFRecords in, a msgpack model directory on HDFS, predictions out."""
  spec, variables = checkpoints.load(digits_model_dir)
  checkpoints.save('hdfs://models/digits', spec, variables, fmt='msgpack')
  records = [encode_file_example(name, data) for name, data in sorted(images.items())]
  records.append(b'not a protobuf \xff\xfe')
  local = hdfs_tfrecord_bytes(records)
  put('hdfs://data/examples/images-00000-of-00001.tfrecord', local)
  classify_images.run([
      '--input=hdfs://data/examples/*.tfrecord', '--model_dir=hdfs://models/digits',
      '--output=hdfs://out/examples/pred', *hdfs.beam_args,
  ])  # fmt: skip
  predictions = read_hdfs_jsonl('hdfs://out/examples/pred-[0-9]*.jsonl')
  failed = read_hdfs_jsonl('hdfs://out/examples/pred_failed-*.jsonl')
  assert {r['key']: r['label'] for r in predictions} == expected_labels(digits_model_dir, images)
  assert [r['stage'] for r in failed] == ['parse']


def hdfs_tfrecord_bytes(records) -> bytes:
  """The bytes of a TFRecord file holding `records` (TensorFlow's writer,
  through a local temp file: tf.io cannot write to WebHDFS)."""
  import tempfile

  with tempfile.NamedTemporaryFile(suffix='.tfrecord') as tmp:
    with tf.io.TFRecordWriter(tmp.name) as writer:
      for record in records:
        writer.write(record)
    with open(tmp.name, 'rb') as f:
      return f.read()
