"""Proxy data for router tuning: sampled from a model, written as an ordinary dataset."""
import subprocess
import sys

from flexolmo_jax.data import catalog
from flexolmo_jax.data.proxy_data import sample_documents, write_dataset
from train_utils import ROOT


def test_samples_are_deterministic_and_become_a_dataset(public_model, tmp_path):
  tok = public_model["data"] / "tokenizer.json"
  kw = dict(samples=8, max_new_tokens=48, temperature=1.0, top_p=0.95)
  docs = sample_documents(public_model["dir"], tok, seed=0, **kw)
  assert docs and all(d.strip() for d in docs)
  assert sample_documents(public_model["dir"], tok, seed=0, **kw) == docs
  assert sample_documents(public_model["dir"], tok, seed=1, **kw) != docs
  path = write_dataset(docs, "proxy_public", tmp_path, validation_fraction=0.2)
  stats = catalog.dataset_stats(path)
  assert sum(stats["num_examples"].values()) == len(docs)


def test_cli_refuses_a_missing_model_and_writes_nothing(public_model, tmp_path):
  out = tmp_path / "data"
  proc = subprocess.run(
      [sys.executable, "-m", "flexolmo_jax.proxy_data", f"--model={tmp_path / 'nope'}",
       "--name=proxy_x", f"--out={out}",
       f"--tokenizer={public_model['data'] / 'tokenizer.json'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "does not exist" in proc.stderr
  assert not (out / "proxy_x").exists()
