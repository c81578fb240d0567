"""Evaluation: exact perplexity, multiple-choice scoring, and what opting an expert out changes."""
import functools
import json
import math

import jax
import numpy as np
import pytest

from eval_utils import drop_expert, save_model, tiny_moe_config
from flexolmo_jax.data import load_tokenizer, make_eval_loader
from flexolmo_jax.evaluate import __main__ as cli
from flexolmo_jax.evaluate.run import EvalOptions, evaluate
from flexolmo_jax.evaluate.subsets import subsets_for
from flexolmo_jax.model import FlexOlmo
from flexolmo_jax.model.expert_mask import UnknownExpertError

SEQ = 64


@pytest.fixture(scope="module")
def moe(flexmix_tiny, tmp_path_factory):
  tok = flexmix_tiny / "tokenizer.json"
  cfg = tiny_moe_config(tok)
  path = tmp_path_factory.mktemp("eval") / "moe4"
  params = save_model(path, cfg)
  return {"dir": path, "cfg": cfg, "params": params, "tok": tok, "data": flexmix_tiny}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _jit_forward(cfg):
  return jax.jit(lambda p, x: FlexOlmo(cfg).apply({"params": p}, x)[0])


def _forward(cfg, params, ids):
  return np.asarray(_jit_forward(cfg)(params, ids))


def _reference_ppl(cfg, params, dataset, tok):
  """exp(mean token loss): plain unsharded forward, log-softmax in float64 numpy."""
  total = count = 0.0
  for b in make_eval_loader(str(dataset), str(tok), SEQ, 8, process_index=0, process_count=1):
    lp = _log_softmax(_forward(cfg, params, b["input_ids"]))
    nll = -np.take_along_axis(lp, b["targets"][..., None].astype(np.int64), -1)[..., 0]
    total += float((nll * b["loss_mask"]).sum())
    count += float(b["loss_mask"].sum())
  return math.exp(total / count), count


def _logits_of(cfg, params, seqs):
  """Logits of each sequence, run together right-padded (causal: padding is never seen)."""
  width = -(-max(len(q) for q in seqs) // 16) * 16
  ids = np.full((len(seqs), width), cfg.pad_token_id, np.int32)
  for i, q in enumerate(seqs):
    ids[i, :len(q)] = q
  out = _forward(cfg, params, ids)
  return [out[i, :len(q)] for i, q in enumerate(seqs)]


def _tokens(tok, text):
  return load_tokenizer(str(tok)).encode(text, add_special_tokens=False).ids


def test_perplexity_is_exp_mean_token_loss(moe):
  res = evaluate(EvalOptions(ckpt=str(moe["dir"]), data=f"math={moe['data'] / 'math'},"
                             f"legal={moe['data'] / 'legal'}", tokenizer=str(moe["tok"]),
                             seq_len=SEQ, batch_size=8), log=lambda *a: None)
  row = res["rows"]["all experts"]["perplexity"]
  for domain in ("math", "legal"):
    ref, count = _reference_ppl(moe["cfg"], moe["params"], moe["data"] / domain, moe["tok"])
    assert row[domain]["tokens"] == count > 0
    np.testing.assert_allclose(row[domain]["ppl"], ref, rtol=2e-5)
    # top-2: every token reaches exactly two experts in every layer
    np.testing.assert_allclose(np.sum(row[domain]["routing"], axis=-1), 2.0, rtol=1e-6)


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_multiple_choice_follows_the_model(moe, tmp_path):
  """Tokenized task whose gold answer is the model's own argmax next token: acc = 100%;
  a text task: each choice's score is the independently computed log-likelihood."""
  cfg, params = moe["cfg"], moe["params"]
  rng = np.random.default_rng(1)
  contexts = [rng.integers(2, 5000, int(rng.integers(3, 20))).tolist() for _ in range(12)]
  rows = []
  for i, (ctx, logits) in enumerate(zip(contexts, _logits_of(cfg, params, contexts))):
    order = np.argsort(logits[-1, :5520])
    best, worst = int(order[-1]), order[:3].tolist()
    choices = [[w] for w in worst]
    gold = i % 4
    choices.insert(gold, [best])
    rows.append({"context_ids": ctx, "choices_ids": choices, "gold": gold})
  ids_task = _write_jsonl(tmp_path / "argmax.jsonl", rows)
  text = [{"context": "def add(a, b):\n    return", "choices": [" a + b", " the court held"],
           "gold": 0},
          {"context": "", "choices": [" x", " yy"], "gold": 1}]
  text_task = _write_jsonl(tmp_path / "text.jsonl", text)
  res = evaluate(EvalOptions(ckpt=str(moe["dir"]), tasks=[str(ids_task), str(text_task)],
                             tokenizer=str(moe["tok"]), batch_size=8), log=lambda *a: None)
  tasks = res["rows"]["all experts"]["tasks"]
  assert tasks["argmax"]["acc"] == 1.0 and tasks["argmax"]["acc_norm"] == 1.0
  assert tasks["argmax"]["n"] == 12
  pairs = []
  for ex in text:
    ctx = _tokens(moe["tok"], ex["context"]) or [cfg.eos_token_id]
    pairs += [(ctx, _tokens(moe["tok"], c)) for c in ex["choices"]]
  logits = _logits_of(cfg, params, [(ctx + cont)[:-1] for ctx, cont in pairs])
  scores = np.asarray(tasks["text"]["loglik"]).reshape(-1)
  for (ctx, cont), lg, ll in zip(pairs, logits, scores):
    lp = _log_softmax(lg)
    ref = sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
    np.testing.assert_allclose(ll, ref, rtol=1e-5)
  # acc_norm divides by the choice's length in characters
  lls = np.asarray(tasks["text"]["loglik"], dtype=object)
  want = np.mean([int(np.argmax(np.asarray(l) / [len(c) for c in ex["choices"]]) == ex["gold"])
                  for ex, l in zip(text, lls)])
  assert tasks["text"]["acc_norm"] == want


def test_opt_out_matrix_changes_only_what_it_should(moe, tmp_path):
  data = f"code={moe['data'] / 'code'},math={moe['data'] / 'math'}"
  base = dict(ckpt=str(moe["dir"]), data=data, tokenizer=str(moe["tok"]), seq_len=SEQ,
              batch_size=8, max_batches=2)
  matrix = evaluate(EvalOptions(**base, opt_out_matrix=True), log=lambda *a: None)["rows"]
  plain = evaluate(EvalOptions(**base), log=lambda *a: None)["rows"]
  assert list(matrix) == ["all experts", "-code", "-math", "-legal", "public only"]
  assert list(plain) == ["all experts"]
  for d in ("code", "math"):
    # the table's "all experts" row == evaluating with an empty exclude list (no mask at all)
    np.testing.assert_allclose(matrix["all experts"]["perplexity"][d]["ppl"],
                               plain["all experts"]["perplexity"][d]["ppl"], rtol=1e-6)
    assert matrix["-math"]["perplexity"][d]["ppl"] != matrix["all experts"]["perplexity"][d]["ppl"]
    share = np.asarray(matrix["-math"]["perplexity"][d]["routing"])
    assert np.all(share[:, 2] == 0) and np.all(share[:, [0, 1, 3]].sum(-1) > 0)
    only = np.asarray(matrix["public only"]["perplexity"][d]["routing"])
    np.testing.assert_allclose(only, [[1, 0, 0, 0]] * 2)  # top-2 but one expert left
  # "-code" == the same model with the code expert physically removed (FFN and router row)
  params3, cfg3 = drop_expert(moe["params"], moe["cfg"], "code")
  save_model(tmp_path / "no_code", cfg3, params=params3)
  removed = evaluate(EvalOptions(**dict(base, ckpt=str(tmp_path / "no_code"))),
                     log=lambda *a: None)["rows"]["all experts"]
  for d in ("code", "math"):
    np.testing.assert_allclose(matrix["-code"]["perplexity"][d]["ppl"],
                               removed["perplexity"][d]["ppl"], rtol=1e-5)


def test_subsets_and_unknown_experts(moe):
  cfg = moe["cfg"]
  assert [s.name for s in subsets_for(cfg, ["math", "code"])] == ["-math,-code"]
  with pytest.raises(UnknownExpertError, match="news"):
    subsets_for(cfg, ["news"])
  with pytest.raises(ValueError, match="either"):
    subsets_for(cfg, ["math"], opt_out_matrix=True)
  two = cfg.replace(num_experts=2, expert_names=("public", "math"))
  assert [s.name for s in subsets_for(two, opt_out_matrix=True)] == ["all experts", "-math"]
  with pytest.raises(UnknownExpertError, match="dense"):
    subsets_for(cfg.replace(num_experts=0, expert_names=()), ["math"])


def test_cli_writes_table_json_and_heatmap(moe, tmp_path, capsys):
  task = _write_jsonl(tmp_path / "t.jsonl", [{"context": "x =", "choices": [" 1", " 2"], "gold": 0}])
  out = tmp_path / "out"
  rc = cli.main([f"--ckpt={moe['dir']}", f"--data={moe['data']}", f"--tasks={task}",
                 "--opt-out-matrix", f"--out={out}", f"--seq_len={SEQ}", "--max_batches=1"])
  assert rc == 0
  results = json.loads((out / "results.json").read_text())
  assert results["domains"] == ["code", "legal", "math", "public"]
  assert len(results["rows"]) == 5 and results["tasks"] == ["t"]
  md = (out / "results.md").read_text()
  assert "| -math |" in md and "ppl legal" in md and "t acc_norm" in md
  assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not list(out.glob(".*"))  # no temporary files left behind
  # --notasks_opt_out: the tasks score the first row only, with the same result.
  first = tmp_path / "first"
  assert cli.main([f"--ckpt={moe['dir']}", f"--data={moe['data']}", f"--tasks={task}",
                   "--opt-out-matrix", f"--out={first}", f"--seq_len={SEQ}", "--max_batches=1",
                   "--notasks_opt_out"]) == 0
  only = json.loads((first / "results.json").read_text())
  assert only["rows"]["all experts"]["tasks"] == results["rows"]["all experts"]["tasks"]
  assert all(r["tasks"] == {} for n, r in only["rows"].items() if n != "all experts")
  assert only["rows"]["-math"]["perplexity"] == results["rows"]["-math"]["perplexity"]
  assert "| -math |" in (first / "results.md").read_text()
  # bad input: unknown expert names and missing files exit 1 with a clear message
  assert cli.main([f"--ckpt={moe['dir']}", f"--data={moe['data']}", "--exclude=news",
                   f"--out={tmp_path / 'x'}"]) == 1
  assert "unknown expert name 'news'" in capsys.readouterr().err
  assert cli.main([f"--ckpt={tmp_path / 'nope'}", f"--tasks={task}", f"--out={tmp_path / 'x'}"]) == 1
  assert "does not exist" in capsys.readouterr().err
  assert cli.main([f"--ckpt={moe['dir']}", f"--tasks={tmp_path / 'missing.jsonl'}",
                   f"--out={tmp_path / 'x'}"]) == 1
  assert "task file not found" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
