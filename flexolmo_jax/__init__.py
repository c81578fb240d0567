"""flexolmo_jax: FlexOlmo mixture-of-experts language models in JAX/Flax.

Pipeline folders: data/ (corpora -> batches), model/ (Flax modules), parallel/
(mesh and logical-axis sharding), convert/ (HuggingFace interop). The core package
never imports torch.
"""

__version__ = "0.1.0"


def load(path, exclude=(), **overrides):
  """Load a model directory, training workdir or imported HF model; see flexolmo_jax.inference.load."""
  from flexolmo_jax.inference.load import load as _load  # lazy: keep `import flexolmo_jax` light
  return _load(path, exclude, **overrides)
