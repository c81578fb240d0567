"""Verbatim extraction (evaluate/extraction.py, `evaluate --extraction`).

A constructed case: a 2-expert model whose expert 1 (FFN and router, as in expert training:
attention, embeddings and the public FFN frozen) memorised a few training documents. With the
expert in, greedy decoding reproduces them (score 1); with it opted out the model is the
public one, which never saw them, and extraction falls to 0.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexolmo_jax.data import prepare_dataset, tokenizer_info, train_bpe_tokenizer
from flexolmo_jax.data import load_tokenizer
from flexolmo_jax.evaluate import __main__ as evaluate_cli
from flexolmo_jax.evaluate import extraction
from flexolmo_jax.evaluate.subsets import subsets_for
from flexolmo_jax.model import FlexOlmo
from flexolmo_jax.storage import model_io
from model_utils import random_params, tiny_config

PREFIX, GEN = 8, 24


def test_similarity_is_normalised_levenshtein():
  assert extraction.similarity([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
  assert extraction.similarity([1, 2, 3, 4], [1, 2, 9, 4]) == pytest.approx(0.75)  # 1 sub / 4
  assert extraction.similarity([1, 2], [1, 2, 3, 4]) == pytest.approx(0.5)  # 2 inserts / 4
  assert extraction.similarity([], [5, 6]) == 0.0


def test_document_windows():
  ids = list(range(10, 30))
  assert extraction.document_windows(ids, 4, 8, eos_id=0) == (ids[:4], ids[4:12])
  # The document ends inside the window: its continuation ends with EOS (the model must stop).
  assert extraction.document_windows(ids, 15, 8, eos_id=0) == (ids[:15], ids[15:] + [0])
  assert extraction.document_windows(ids[:4], 4, 8, eos_id=0) is None
  scored = extraction.score([[1, 2], [7, 3]],
                            [extraction.Document([0], [1, 2], "a"),
                             extraction.Document([0], [1, 3], "b")], threshold=0.9)
  assert scored["extracted"] == 0.5 and scored["similarity"] == pytest.approx(0.75)
  with pytest.raises(ValueError, match="threshold"):
    extraction.ExtractionOptions(threshold=0.0)


_WORDS = ("amber basil cedar delta ember fjord grove heron indigo juniper kestrel lumen "
          "marble nectar onyx pebble quartz russet sable tundra umber velvet willow").split()


def _documents(n, words, seed):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=words)) for _ in range(n)]


def _memorise(cfg, params, sequences, steps=150):
  """Trains expert 1's FFN and every router row on `sequences` (the rest frozen)."""
  model = FlexOlmo(cfg)
  ids = jnp.asarray(sequences, jnp.int32)

  def trainable(path, x):
    name = jax.tree_util.keystr(path)
    if "mlp" not in name:
      return jnp.zeros_like(x)
    if "router" in name:
      return jnp.ones_like(x)
    return jnp.ones_like(x).at[:, 0].set(0)  # the public expert's FFN stays frozen
  keep = jax.tree_util.tree_map_with_path(trainable, params)

  def loss_fn(p):
    logits = model.apply({"params": p}, ids[:, :-1])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    g = jax.tree.map(jnp.multiply, g, keep)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = opt.init(params)
  for _ in range(steps):
    params, state, loss = step(params, state)
  return params, float(loss)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
  """(model dir, dataset dir, tokenizer, public params): expert 'secret' memorised the
  training split of the 'secret' dataset."""
  root = tmp_path_factory.mktemp("extraction")
  docs = _documents(4, 40, seed=0)
  tok_path = str(root / "tokenizer.json")
  train_bpe_tokenizer(docs + _documents(40, 40, seed=1), 300, tok_path)
  info = tokenizer_info(tok_path)
  (root / "raw").mkdir()
  with open(root / "raw" / "docs.jsonl", "w") as fh:
    for d in docs:
      fh.write(json.dumps({"text": d}) + "\n")
  dataset = prepare_dataset("secret", [str(root / "raw")], str(root / "data"),
                            validation_fraction=0.0)
  tok = load_tokenizer(tok_path)
  encoded = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
  assert min(len(e) for e in encoded) > PREFIX + GEN
  cfg = tiny_config(vocab_size=info.padded_vocab_size, d_model=64, ffn_hidden=128,
                    num_experts=2, top_k=2, expert_names=("public", "secret"),
                    eos_token_id=info.eos_id, pad_token_id=info.pad_id, max_seq_len=64)
  public = random_params(cfg)
  # A head as sharp as a trained model's (init scale caps every logit near 1, and so the loss).
  public["lm_head"] = public["lm_head"] * 40.0
  params, loss = _memorise(cfg, public, [e[:PREFIX + GEN + 1] for e in encoded])
  assert loss < 0.05, f"the constructed expert did not memorise its documents (loss {loss})"
  model_dir = str(root / "model")
  model_io.save_model_dir(model_dir, params, cfg)
  return model_dir, dataset, tok_path, cfg, params


def test_memorised_document_is_extracted_only_with_its_expert(memorised):
  _, dataset, tok_path, cfg, params = memorised
  opts = extraction.ExtractionOptions(prefix_len=PREFIX, gen_len=GEN, num_docs=8, batch_size=4)
  docs = extraction.sample_documents(dataset, tok_path, cfg.eos_token_id, opts)
  assert len(docs) == 4  # every document of the split, no more
  assert all(len(d.prefix) == PREFIX and len(d.continuation) == GEN for d in docs)
  rates = extraction.extraction_rates(params, cfg, {"secret": docs},
                                      subsets_for(cfg, opt_out_matrix=True), opts, log=lambda m: None)
  with_expert, without = rates["all experts"]["secret"], rates["-secret"]["secret"]
  assert with_expert["extracted"] == 1.0 and with_expert["similarity"] == 1.0
  assert without["extracted"] == 0.0 and without["similarity"] < 0.5


def test_evaluate_cli_reports_extraction_per_opt_out_row(memorised, tmp_path):
  model_dir, dataset, tok_path, _, _ = memorised
  out = tmp_path / "eval"
  rc = evaluate_cli.main([f"--ckpt={model_dir}", f"--data=secret={dataset}",
                          f"--tokenizer={tok_path}", "--opt-out-matrix", "--noperplexity",
                          "--extraction=train", "--extraction_docs=4",
                          f"--extraction_prefix={PREFIX}", f"--extraction_tokens={GEN}",
                          "--batch_size=2", f"--out={out}"])
  assert rc == 0
  results = json.loads((out / "results.json").read_text())
  rows = results["rows"]
  assert rows["all experts"]["extraction"]["secret"]["extracted"] == 1.0
  assert rows["-secret"]["extraction"]["secret"]["extracted"] == 0.0
  assert results["extraction"]["prefix_len"] == PREFIX and results["domains"] == []
  assert "Verbatim extraction" in (out / "results.md").read_text()


def test_extraction_bad_input_is_a_clear_error(memorised, tmp_path, capsys):
  model_dir, dataset, tok_path, _, _ = memorised
  common = [f"--ckpt={model_dir}", f"--data=secret={dataset}", f"--tokenizer={tok_path}",
            "--noperplexity", f"--out={tmp_path / 'e'}"]
  assert evaluate_cli.main(common + ["--extraction=validation"]) == 1  # the split is empty
  assert "validation" in capsys.readouterr().err
  assert evaluate_cli.main(common + ["--extraction=train", "--extraction_prefix=500"]) == 1
  assert "longer than the 500-token prefix" in capsys.readouterr().err
  assert not (tmp_path / "e").exists()
