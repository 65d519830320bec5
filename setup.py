"""beam_dl: Apache Beam transforms and pipelines for JAX/Flax deep learning.

Also serves as Beam's `--setup_file` for staging to remote workers
(Dataflow, Flink, Spark): workers run `pip install .` with the same
requirements, so keep the pins in constraints.txt in step with REQUIRED.
"""

import setuptools

REQUIRED = [
  'apache-beam[gcp]>=2.77,<2.78',
  'tensorflow>=2.21,<2.22',
  'tfx-bsl>=1.21,<1.22',
  'tensorflow-transform>=1.21,<1.22',
  'jax>=0.10,<0.11',
  'flax>=0.12,<0.13',
  'optax>=0.2.8,<0.3',
  'orbax-checkpoint>=0.12,<0.13',
  'pillow>=11',
  'numpy>=2,<2.5',
  'scipy>=1.11',  # STFT spectrograms (beam_dl.features.spectrogram)
  'tifffile>=2024.8',  # 16-bit, float and multi-page TIFFs (beam_dl.decoding.images)
  'google-crc32c>=1.5',  # TFRecord framing checks (beam_dl.io.tfrecord); also via apache-beam[gcp]
  'prometheus-client>=0.20',  # pipelines' --metrics_port / --metrics_pushgateway (beam_dl.operations.metrics_export)
  'tensorboard>=2.21,<2.22',  # tf.summary's writer for training summaries (TF 2.21 no longer pulls it in)
  'qwix>=0.1.8,<0.2',
  'pandas>=2,<4',  # key factorization in the windowed batch path (beam_dl.features.batch_windows)  # int8 quantization (beam_dl.compression); needed to serve quantized dirs
]
EXTRAS = {
  # Model registry (beam_dl.operations.registry_mlflow) and the tracking server its tests start.
  'mlflow': ['mlflow>=3.17,<3.18'],
  # Beam's hdfs:// filesystem talks WebHDFS through this client.
  'hdfs': ['hdfs>=2.7,<3'],
  # The demo and tests use real data shipped by these packages.
  'data': ['scikit-learn>=1.5', 'statsmodels>=0.14', 'scikit-image>=0.24'],
  # score_sequences --kafka_* with the Python reader/writer (beam_dl.io.kafka).
  'kafka': ['confluent-kafka>=2.16,<3'],
  # pipelines.train --plot: a PNG of the training curves.
  'plots': ['matplotlib>=3.8'],
  'test': [
    'pytest>=8',
    'pytest-timeout>=2.3',
    'pytest-xdist>=3.6',
    'ruff==0.17.6',  # lint and format (ruff.toml), run first by .ci/run
    'scikit-learn>=1.5',
    'statsmodels>=0.14',
    'scikit-image>=0.24',
    'matplotlib>=3.8',
    # Serving a jax2tf export through Beam's own TF handler, whose module
    # imports tensorflow_hub; that imports pkg_resources, gone in setuptools 81.
    'tensorflow-hub>=0.16,<0.17',
    'setuptools<81',
    'mlflow>=3.17,<3.18',
    'hdfs>=2.7,<3',
    'confluent-kafka>=2.16,<3',  # tests/test_kafka.py, against the broker from `make kafka-jars`
  ],
}

setuptools.setup(
  name='beam_dl',
  version='0.1.0',
  description='Apache Beam SDK extension for deep learning with JAX/Flax',
  long_description=open('README.md', encoding='utf-8').read() if __import__('os').path.exists('README.md') else '',
  long_description_content_type='text/markdown',
  python_requires='>=3.11,<3.13',
  packages=setuptools.find_packages(
    include=['beam_dl', 'beam_dl.*', 'transforms', 'transforms.*', 'pipelines', 'pipelines.*']
  ),
  package_data={'pipelines': ['templates/*.json']},
  install_requires=REQUIRED,
  extras_require=EXTRAS,
  # Model locations beyond Beam's filesystems (beam_dl.models.checkpoints.resolve):
  # `models:/` URIs are fetched from the MLflow registry.
  entry_points={'beam_dl.model_locations': ['models = beam_dl.operations.registry_mlflow:local_model_dir']},
  license='Apache-2.0',
)
