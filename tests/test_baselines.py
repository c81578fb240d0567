"""The paper's baselines beyond merging (issue 13 item 5): BTX, the unrestricted MoE at the
lifecycle's training FLOPs, and prompt-based routing. (Posterior-weighted BTM's hand check is
tests/test_router_method.py::test_posterior_btm_equals_hand_computed_mixture.)"""
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from flexolmo_jax import config_base
from flexolmo_jax.evaluate import baselines
from flexolmo_jax.experiments import flop_budget
from flexolmo_jax.model.flops import (executed_train_flops, train_flops, weight_flops_by_leaf,
                                      weight_flops_per_token)
from flexolmo_jax.storage import model_io
from flexolmo_jax.train.init import InitError, initial_params
from flexolmo_jax.train.trainer import setup_training
from model_utils import tiny_config
from train_utils import ROOT, load_config

DOMAINS = ("code", "math", "legal")


def _mini():
  import importlib.util
  path = ROOT / "configs" / "flexmix_mini.py"
  spec = importlib.util.spec_from_file_location("flexmix_mini", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# --- BTX and the unrestricted MoE: what trains, on what, from what -------------------------


def test_btx_trains_every_leaf_and_router_tuning_does_not():
  btx, router = load_config("flexmix_mini", "btx,tiny"), load_config("flexmix_mini", "router,tiny")
  # The merged model's architecture and inference top-k, trained (not tuned) at top-k 2.
  assert config_base.model_config(btx) == config_base.model_config(router)
  b_setup, r_setup = setup_training(btx), setup_training(router)
  assert b_setup.cfg.top_k == 2 and b_setup.cfg.num_experts == 4
  b_rules, r_rules = dict(b_setup.partition.rules), dict(r_setup.partition.rules)
  assert b_rules.keys() == r_rules.keys()
  assert all(r.trainable and r.slots is None for r in b_rules.values())  # whole leaves
  assert not b_setup.frozen_shardings
  tuned = {k for k, r in r_rules.items() if r.trainable}
  assert tuned == {"decoder/layers/mlp/router"}
  assert len(r_rules) - len(tuned) >= 10  # attention, FFNs, embeddings, head, norms frozen
  # Everyone's data (the owners' own, not proxies) -- what makes BTX the upper bound.
  assert sorted(n for n, _ in btx.data.sources) == sorted(("public",) + DOMAINS)
  assert all(not n.startswith("proxy_") for n, _ in btx.data.sources)
  with pytest.raises(InitError, match="btx stage needs config.init.params"):
    initial_params(btx, b_setup.cfg, None, jax.random.key(0))


def test_unrestricted_is_the_merged_architecture_from_random_init_on_all_data():
  config = load_config("flexmix_mini", "unrestricted,tiny")
  router = load_config("flexmix_mini", "router,tiny")
  assert config_base.model_config(config) == config_base.model_config(router)
  setup = setup_training(config)
  assert all(r.trainable and r.slots is None for _, r in setup.partition.rules)
  assert sorted(n for n, _ in config.data.sources) == sorted(("public",) + DOMAINS)
  params, provenance = initial_params(config, setup.cfg, None, jax.random.key(0))
  assert provenance["from"] == "random"
  assert params["decoder"]["layers"]["mlp"]["gate_proj"].shape[1] == 4


# --- equal training FLOPs ------------------------------------------------------------------


def test_executed_flops_skip_only_the_frozen_weight_gradients():
  cfg = tiny_config(num_experts=2, top_k=2)
  B, T = 3, 16
  assert executed_train_flops(cfg, B, T) == pytest.approx(train_flops(cfg, B, T))
  assert sum(weight_flops_by_leaf(cfg).values()) == pytest.approx(weight_flops_per_token(cfg))
  # The expert stage's partition: expert 1's FFN and its router row train.
  expert = load_config("flexmix_mini", "expert,math,tiny")
  ecfg = config_base.step_model_config(expert)
  from flexolmo_jax.train.partition import config_partition
  fr = flop_budget.trained_fractions(config_partition(expert), ecfg)
  assert fr["gate_proj"] == fr["router"] == 0.5 and fr["q_proj"] == fr["lm_head"] == 0.0
  d, I, L = ecfg.d_model, ecfg.ffn_hidden, ecfg.n_layers
  B, T = int(expert.train.global_batch_size), int(expert.train.seq_len)
  # By hand: 3x forward minus the weight gradients of everything frozen, i.e. forward +
  # activation gradients (2 W) + one expert's 3 FFN matmuls + one router row, per layer.
  W = sum(weight_flops_by_leaf(ecfg).values())
  attn = L * 2.0 * T * ecfg.n_heads * ecfg.head_dim  # causal: half of 4 T H h
  want = B * T * (2 * W + L * (2 * 3 * d * I + 2 * d) + 3 * attn)
  assert flop_budget.step_flops(expert) == pytest.approx(want)
  assert flop_budget.step_flops(expert) < train_flops(ecfg, B, T)


def test_unrestricted_steps_give_the_lifecycle_flops_within_one_step():
  mini = _mini()
  for size in ("tiny", "small"):
    stages = mini.lifecycle_configs(size)
    assert set(stages) == {"public", "router"} | {f"expert_{d}" for d in DOMAINS}
    budget = sum(flop_budget.lifecycle_flops(stages).values())
    config = load_config("flexmix_mini", f"unrestricted,{size}")
    per_step = flop_budget.step_flops(config)
    # Everything trains: the executed count is the 6N convention of the unrestricted model.
    cfg = config_base.model_config(config)
    assert per_step == pytest.approx(train_flops(cfg, int(config.train.global_batch_size),
                                                 int(config.train.seq_len)))
    assert abs(int(config.train.steps) * per_step - budget) <= per_step / 2
    # The lifecycle's stages are counted as they run: public = 6N of the dense model; each
    # expert and router tuning less than 6N of what they run (frozen weights).
    pub = stages["public"]
    assert flop_budget.stage_flops(pub) == pytest.approx(int(pub.train.steps) * train_flops(
        config_base.model_config(pub), int(pub.train.global_batch_size), int(pub.train.seq_len)))
    for name in ("expert_math", "router"):
      c = stages[name]
      full = int(c.train.steps) * train_flops(config_base.step_model_config(c),
                                              int(c.train.global_batch_size),
                                              int(c.train.seq_len))
      assert flop_budget.stage_flops(c) < full
  no_router = load_config("flexmix_mini", "unrestricted,tiny,norouter")
  with_router = load_config("flexmix_mini", "unrestricted,tiny")
  assert int(no_router.train.steps) < int(with_router.train.steps)
  with pytest.raises(ValueError, match="unknown stage"):
    load_config("flexmix_mini", "btm,tiny")


# --- prompt-based routing ------------------------------------------------------------------

LOW, HIGH = (3, 7), (60, 64)  # constructed "public" and "math" text: disjoint token sets


def _rows(rng, n, tokens, T=12, pad_last=0):
  ids = rng.integers(*tokens, size=(n, T + 1))
  mask = np.ones((n, T), np.float32)
  if pad_last:
    mask[-1, T - pad_last:] = 0
  return {"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
          "loss_mask": mask}


class Recorded(list):
  """A loader (list of batches) that counts how often it was iterated."""
  passes = 0

  def __iter__(self):
    self.passes += 1
    return super().__iter__()


def _np_params(cfg, seed):
  """Random params from numpy (nothing to compile): weights N(0, 0.02), norm scales near 1,
  router rows at a scale where routing is not uniform."""
  from flexolmo_jax.model import abstract_params
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = "/".join(getattr(k, "key", str(k)) for k in path)
    if name.endswith("scale"):
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    return ((0.3 if "router" in name else 0.02) * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


@pytest.fixture(scope="module")
def members():
  """The public model (dense) and a 2-expert "math" owner model, random (both tests)."""
  dense = tiny_config(num_experts=0, top_k=1)
  moe = tiny_config(num_experts=2, top_k=2, expert_names=("public", "math"))
  return {"public": (dense, _np_params(dense, 0)), "math": (moe, _np_params(moe, 3))}


def _hand_loss(cfg, params, local, rows):
  from model_utils import forward
  logits, _ = forward(cfg, params, local["input_ids"])
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  ce = -np.take_along_axis(np.asarray(logp), local["targets"][..., None], -1)[..., 0]
  return float(np.sum((ce * local["loss_mask"])[rows])), float(local["loss_mask"][rows].sum())


def test_prompt_router_learns_from_coordinator_data_and_scores_with_the_chosen_member(members):
  rng = np.random.default_rng(0)
  coord = {"public": Recorded([_rows(rng, 8, LOW) for _ in range(4)]),
           "math": Recorded([_rows(rng, 8, HIGH) for _ in range(2)])}
  router = baselines.train_prompt_router(*members["public"], coord, prefix_tokens=4)
  assert router.labels == ("public", "math")
  assert router.trained_on == {"public": 32, "math": 16}  # every given row, nothing else
  assert coord["public"].passes == coord["math"].passes == 1
  # Evaluation rows: a batch mixing both kinds (math rows first), the last row part padded.
  a, b = _rows(rng, 3, HIGH), _rows(rng, 5, LOW, pad_last=5)
  local = {k: np.concatenate([a[k], b[k]]) for k in a}
  choice = router.predict(router.features(local["input_ids"], local["loss_mask"] > 0))
  assert choice.tolist() == [1] * 3 + [0] * 5
  got = baselines.prompt_routing_scores(router, members, [local])
  s1, n1 = _hand_loss(*members["math"], local, np.arange(8) < 3)
  s0, n0 = _hand_loss(*members["public"], local, np.arange(8) >= 3)
  np.testing.assert_allclose(got["loss"], (s0 + s1) / (n0 + n1), rtol=1e-5)
  assert got["routed"] == {"public": 5 / 8, "math": 3 / 8} and got["rows"] == 8
  assert baselines.prompt_routing_losses(router, members, [local]) == pytest.approx(got["loss"])
  # Routing by the prefix only: rows whose prefix is "math" go to math whatever follows.
  mixed = _rows(rng, 8, LOW)
  mixed["input_ids"][:, :4] = rng.integers(*HIGH, size=(8, 4))
  picked = router.predict(router.features(mixed["input_ids"], mixed["loss_mask"] > 0))
  assert picked.tolist() == [1] * 8
  with pytest.raises(ValueError, match="no member"):
    baselines.prompt_routing_scores(router, {"public": members["public"]}, [local])


def test_prompt_routing_on_the_demo_layout_reads_owner_data_only_to_evaluate(members, tmp_path,
                                                                            monkeypatch):
  import flexolmo_jax.data as data_pkg
  work, data = tmp_path / "work", tmp_path / "data"
  model_io.save_model_dir(work / "public" / "export", members["public"][1], members["public"][0],
                          {"stage": "test"})
  model_io.save_model_dir(work / "expert_math" / "export", members["math"][1], members["math"][0],
                          {"stage": "test"})
  (data / "proxy_math").mkdir(parents=True)
  opened = []

  def fake_loader(dataset, tokenizer, seq_len, batch, *args, split="validation", **kw):
    name = dataset.rsplit("/", 1)[-1]
    opened.append((name, split))
    rng = np.random.default_rng(len(opened))
    return [_rows(rng, 8, HIGH if "math" in name else LOW) for _ in range(3)]

  monkeypatch.setattr(data_pkg, "make_eval_loader", fake_loader)
  out = baselines.prompt_routing(work, data, domains=("math",), seq_len=12, prefix_tokens=4)
  trained = {n for n, s in opened if s == "train"}
  assert trained == {"public", "proxy_math"}
  assert ("math", "validation") in opened and ("math", "train") not in opened
  assert out["trained_on"] == {"public": 24, "math": 24}
  assert out["routing_accuracy"] == {"public": 1.0, "math": 1.0}
  assert set(out["loss"]) == {"public", "math"}
  assert all(math.isfinite(v) for v in out["loss"].values())
  (data / "proxy_math").rmdir()
  with pytest.raises(FileNotFoundError, match="proxy_math"):
    baselines.prompt_routing(work, data, domains=("math",), seq_len=12)


# --- the stages run from the command line ----------------------------------------------------


def _train_cli(arg, workdir, data_root, *extra):
  import os
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "flexolmo_jax.train",
         f"--config={ROOT / 'configs' / 'flexmix_mini.py'}:{arg}", f"--workdir={workdir}",
         f"--config.data.root={data_root}", "--config.train.steps=2",
         "--config.checkpoint.every=2", "--config.data.num_threads=1", *extra]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  return model_io.read_meta(workdir / "export")


def test_btx_trains_every_leaf_from_the_cli(flexmix_tiny, tmp_path):
  """Two BTX steps from a stitched-layout model: every leaf moves. (One process costs ~1 min
  here, mostly compiling the 4-expert step; the unrestricted stage runs the same trainer
  path from random init, checked in-process above without training.)"""
  config = load_config("flexmix_mini", "btx,tiny")
  cfg = config_base.model_config(config)
  start = _np_params(cfg, 1)
  model_io.save_model_dir(tmp_path / "merged", start, cfg, {"stage": "test"})
  meta = _train_cli("btx,tiny", tmp_path / "btx", flexmix_tiny,
                    f"--config.init.params={tmp_path / 'merged'}")
  assert meta["stage"] == "btx" and meta["step"] == 2
  after = jax.device_get(model_io.load_params(tmp_path / "btx" / "export", cfg))
  before = jax.device_get(start)
  from flexolmo_jax.train.partition import flatten
  same = [k for k, v in flatten(after).items()
          if np.array_equal(np.asarray(v), np.asarray(flatten(before)[k]))]
  assert same == []  # every leaf moved: attention, embeddings, head, every expert, router
  summary = json.loads((tmp_path / "btx" / "summary.json").read_text())
  assert set(summary["eval_loss"]) == {"public"} | set(DOMAINS)  # evaluated on every domain
