"""flexolmo_jax: FlexOlmo mixture-of-experts language models in JAX/Flax.

Pipeline folders: data/ (corpora -> batches), model/ (Flax modules), parallel/
(mesh and logical-axis sharding), convert/ (HuggingFace interop). The core package
never imports torch.
"""

__version__ = "0.1.0"
