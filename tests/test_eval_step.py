"""One evaluation step: training's validation loss, `evaluate`, the baselines and the demo all
score tokens through `evaluate.steps`, and agree with an independent float64 reference."""
import math

import jax
import ml_collections
import numpy as np
import pytest

from eval_utils import save_model, tiny_moe_config
from flexolmo_jax.data import make_eval_loader
from flexolmo_jax.evaluate import baselines, steps
from flexolmo_jax.evaluate.perplexity import evaluate_domains
from flexolmo_jax.evaluate.subsets import subsets_for
from flexolmo_jax.inference.load import load
from flexolmo_jax.parallel import DEFAULT_RULES, make_mesh, param_shardings
from flexolmo_jax.parallel.chips import CHIPS, chip_for, peak_flops_for
from flexolmo_jax.train import trainer

SEQ = 64


@pytest.fixture(scope="module")
def moe(flexmix_tiny, tmp_path_factory):
  tok = flexmix_tiny / "tokenizer.json"
  cfg = tiny_moe_config(tok)
  path = tmp_path_factory.mktemp("evalstep") / "moe4"
  params = save_model(path, cfg, seed=3)
  return {"dir": path, "cfg": cfg, "params": params, "tok": tok, "data": flexmix_tiny}


def _loader(moe, domain):
  return make_eval_loader(str(moe["data"] / domain), str(moe["tok"]), SEQ, 8, 0, 1)


def _reference_loss(moe, domain):
  """Mean token loss from `flexolmo_jax.load(...).logits`, log-softmax in float64 numpy."""
  model = load(moe["dir"])
  total = count = 0.0
  for b in _loader(moe, domain):
    x = np.asarray(model.logits(b["input_ids"]), np.float64)
    m = x.max(-1, keepdims=True)
    lp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp, b["targets"][..., None].astype(np.int64), -1)[..., 0]
    total += float((nll * b["loss_mask"]).sum())
    count += float(b["loss_mask"].sum())
  return total / count


def test_every_evaluation_path_gives_the_same_loss(moe):
  cfg, params = moe["cfg"], moe["params"]
  want = _reference_loss(moe, "math")

  # `python -m flexolmo_jax.evaluate`'s path: the sharded loss step over a mesh.
  mesh = make_mesh({"fsdp": -1})
  rules = DEFAULT_RULES
  p_sh = param_shardings(cfg, mesh, rules)
  sharded = jax.device_put(params, p_sh)
  step = steps.jit_step(steps.make_loss_fn(cfg, rules), p_sh, mesh, rules, 8, SEQ)
  rows = evaluate_domains(step, sharded, cfg, {"math": str(moe["data"] / "math")},
                          str(moe["tok"]), SEQ, 8, subsets_for(cfg),
                          steps.batch_shardings(mesh, rules, 8, SEQ))
  got_eval = next(iter(rows.values()))["math"]["loss"]

  # Training's validation loss (the trainer's `evaluate`, unsharded here).
  config = ml_collections.ConfigDict({
      "eval": {"sources": {"math": str(moe["data"] / "math")}, "global_batch_size": 8},
      "data": {"tokenizer": str(moe["tok"]), "root": ""}, "train": {"seq_len": SEQ}})
  got_train = trainer.evaluate(params, cfg, (), config, None, None)["math"]

  # The baselines (the demo's comparison rows).
  got_model = baselines.model_loss(cfg, params, _loader(moe, "math"))
  got_btm_one = baselines.ensemble_loss([(cfg, params)], _loader(moe, "math"))
  got_btm_same = baselines.ensemble_loss([(cfg, params), (cfg, params)], _loader(moe, "math"))

  for name, got in [("evaluate", got_eval), ("train", got_train), ("model_loss", got_model),
                    ("btm of one", got_btm_one), ("btm of two copies", got_btm_same)]:
    assert math.isclose(got, want, rel_tol=1e-5), (name, got, want)


def test_ensemble_of_different_models_is_the_mixture(moe, tmp_path):
  cfg = moe["cfg"]
  other = save_model(tmp_path / "other", cfg, seed=11)
  members = [(cfg, moe["params"]), (cfg, other)]
  got = baselines.ensemble_loss(members, _loader(moe, "code"), weighting="uniform")
  total = count = 0.0
  fn = jax.jit(steps.make_logprob_fn(cfg, ()))
  for b in _loader(moe, "code"):
    batch = steps.global_batch(b)
    lp = np.stack([np.asarray(fn(p, batch), np.float64) for _, p in members])
    mix = np.logaddexp(lp[0], lp[1]) - math.log(2)
    total += float(-(mix * b["loss_mask"]).sum())
    count += float(b["loss_mask"].sum())
  assert math.isclose(got, total / count, rel_tol=1e-6)
  single = [baselines.model_loss(cfg, p, _loader(moe, "code")) for _, p in members]
  assert got < max(single)  # a mixture is never worse than its worst member


def test_chip_table_matches_device_kinds_exactly():
  assert peak_flops_for("TPU v5 lite") == 197e12  # a v5e, not the v5p's "TPU v5"
  assert peak_flops_for("TPU v5") == 459e12
  assert peak_flops_for("TPU v6 lite") == 918e12
  assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
  assert peak_flops_for("cpu") is None
  assert peak_flops_for("TPU v5 litepod-ish") is None  # no substring matching
  kinds = [k for c in CHIPS.values() for k in c.device_kinds]
  assert len(kinds) == len(set(kinds))  # each device kind names one chip
  assert chip_for("v5litepod:4x4").name == "TPU v5e"
  with pytest.raises(ValueError, match="unknown TPU generation"):
    chip_for("h100:8")
