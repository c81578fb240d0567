"""flexolmo_jax: FlexOlmo mixture-of-experts language models in JAX/Flax.

Pipeline folders, in the order the lifecycle uses them: data/ (owners' files -> batches; owner
tools), model/ (the Flax modules), parallel/ (mesh, sharding rules, accelerators), train/ (one
trainer for every stage), storage/ (model directories, checkpoints, streaming I/O), stitch/
(merge, prune, verify), convert/ (HuggingFace interop), evaluate/ (the one evaluation step,
baselines), inference/ (load with opt-out, generate), aot/ (TPU planning), experiments/ (the
demo). The core package never imports torch.
"""

__version__ = "0.1.0"


def load(path, exclude=(), **overrides):
  """Load a model directory, training workdir or imported HF model: see
  flexolmo_jax.inference.load.load (compute dtype: the config's, bf16 by default)."""
  from flexolmo_jax.inference.load import load as _load  # lazy: keep `import flexolmo_jax` light
  return _load(path, exclude, **overrides)
