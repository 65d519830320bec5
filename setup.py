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
    'qwix>=0.1.8,<0.2',  # int8 quantization (beam_dl.compression); needed to serve quantized dirs
]
EXTRAS = {
    # The demo and tests use real data shipped by these packages.
    'data': ['scikit-learn>=1.5', 'statsmodels>=0.14', 'scikit-image>=0.24'],
    'test': [
        'pytest>=8',
        'pytest-timeout>=2.3',
        'pytest-xdist>=3.6',
        'scikit-learn>=1.5',
        'statsmodels>=0.14',
        'scikit-image>=0.24',
        # Serving a jax2tf export through Beam's own TF handler, whose module
        # imports tensorflow_hub; that imports pkg_resources, gone in setuptools 81.
        'tensorflow-hub>=0.16,<0.17',
        'setuptools<81',
    ],
}

setuptools.setup(
    name='beam_dl',
    version='0.1.0',
    description='Apache Beam SDK extension for deep learning with JAX/Flax',
    long_description=open('README.md', encoding='utf-8').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.11,<3.13',
    packages=setuptools.find_packages(include=['beam_dl', 'beam_dl.*', 'transforms', 'transforms.*', 'pipelines', 'pipelines.*']),
    package_data={'pipelines': ['templates/*.json']},
    install_requires=REQUIRED,
    extras_require=EXTRAS,
    license='Apache-2.0',
)
