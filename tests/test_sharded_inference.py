"""Sharded inference on 8 host devices: `load(path, mesh=...)` restores params into their
shardings, and sharded greedy generation gives exactly the single-device tokens (fp32) with
the KV cache split over batch and KV heads; the AOT planner's decode mode fits a tiny model."""
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import flexolmo_jax
from flexolmo_jax import config_base
from eval_utils import save_model
from flexolmo_jax.aot import libtpu_installed
from flexolmo_jax.inference import generate as gen
from flexolmo_jax.parallel import DEFAULT_RULES, make_mesh, param_shardings
from model_utils import random_params, tiny_config
from train_utils import load_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")
NAMES = ("public", "a", "b", "c")


def _moe(**kw):
  # 4 KV heads, so tensor=2 splits them (the cache's head dimension really is sharded).
  return tiny_config(n_kv_heads=4, num_experts=4, top_k=2, expert_names=NAMES, **kw)


def _prompts(cfg, lengths=(3, 9, 5)):
  rng = np.random.default_rng(0)
  return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("mesh_shape,dispatch", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, "dense"),
    ({"fsdp": 2, "expert": 2, "tensor": 2}, "dropless"),
])
def test_sharded_generate_equals_one_device(mesh_shape, dispatch):
  cfg = _moe(dispatch=dispatch)
  params = random_params(cfg, seed=3)
  prompts = _prompts(cfg)
  excludes = [["a"], [], ["b", "c"]]  # expert opt-out, per example
  s = gen.Sampling(max_new_tokens=8, stop_at_eos=False)
  one = gen.generate(params, cfg, prompts, s, excludes)
  mesh = make_mesh(mesh_shape)
  p_sh = param_shardings(cfg, mesh, DEFAULT_RULES)
  sharded = jax.device_put(params, p_sh)
  fn = gen.make_generate_fn(cfg, s, mesh)
  assert gen.generate(sharded, cfg, prompts, s, excludes, fn=fn, mesh=mesh) == one
  # The opt-out matters for this model, so the equality above covers the masked path.
  assert gen.generate(sharded, cfg, prompts, s, fn=fn, mesh=mesh) != one

  if "expert" in mesh_shape:
    return  # the layout checks below once (each compile costs seconds here)
  # Params really are split: q_proj [L, d, H, D] over (fsdp, tensor).
  q = sharded["decoder"]["layers"]["self_attn"]["q_proj"]
  assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
  # The cache of the compiled program (4 rows: 3 prompts padded to the 4 batch shards, 16+8
  # slots) is [L, B/4, S, Hkv/2, D] per device; the whole [2, 4, 24, 4, 8] never exists.
  ids, valid = gen.left_pad(prompts + prompts[:1], cfg.pad_token_id)
  cache = gen.cache_shardings(cfg, mesh, DEFAULT_RULES, 4, ids.shape[1] + 8)
  assert cache.k.spec == P(None, ("data", "fsdp", "expert"), None, "tensor", None)
  assert cache.valid.spec == P(("data", "fsdp", "expert"), None)
  assert gen.batch_shards(mesh, DEFAULT_RULES) == 4
  placed = fn.place(ids, valid, np.ones((4, 4), bool))
  with jax.set_mesh(mesh):
    hlo = fn.jitted(*ids.shape).lower(sharded, *placed, jax.random.key(0)).compile().as_text()
  shapes = set(re.findall(r"f32\[2,\d+,24,\d+,8\]", hlo))
  assert "f32[2,1,24,2,8]" in shapes and "f32[2,4,24,4,8]" not in shapes, shapes


def test_load_with_mesh_restores_sharded_and_matches(tmp_path):
  cfg = _moe(dispatch="dense")
  save_model(tmp_path / "m", cfg, seed=5)
  one = flexolmo_jax.load(tmp_path / "m", exclude=["b"])
  many = flexolmo_jax.load(tmp_path / "m", exclude=["b"], mesh={"fsdp": 2, "tensor": 4})
  assert one.mesh is None and dict(many.mesh.shape)["fsdp"] == 2
  gate = many.params["decoder"]["layers"]["mlp"]["gate_proj"]  # [L, E, d, f]
  assert tuple(gate.sharding.spec) == (None, "expert", "fsdp", "tensor")
  assert len(gate.sharding.device_set) == 8
  assert gate.addressable_shards[0].data.shape == (2, 4, 16, 12)
  ids = np.asarray(_prompts(cfg, (7, 7, 7, 7)), np.int32)
  np.testing.assert_allclose(many.logits(ids), one.logits(ids), atol=1e-5, rtol=0)
  s = gen.Sampling(max_new_tokens=6, stop_at_eos=False)
  prompts = _prompts(cfg)
  assert many.generate(prompts, s) == one.generate(prompts, s)
  assert many.generate(prompts, s, exclude=[]) == one.generate(prompts, s, exclude=[])


@pytest.mark.skipif(not libtpu_installed(), reason="libtpu is not installed: cannot compile "
                    "for TPU")
def test_aot_decode_plan_on_a_small_topology():
  from flexolmo_jax.aot import plan, report
  config = load_config("tiny", "moe4")
  config.mesh.fsdp = 2
  config.mesh.tensor = 2
  r = plan(config, "v5p:2x2x1", "decode", seq_len=128, global_batch_size=8,
           log=lambda *a: None)
  assert r["mode"] == "decode" and r["chips"] == 4 and r["fits"]
  cfg = config_base.model_config(config)
  # The cache as planned: k and v of [L, 8, 128, Hkv, D] split 2 (batch) x 2 (heads), the
  # [8, 128] validity over the batch, the int32 index whole.
  kv = 2 * cfg.n_layers * 8 * 128 * cfg.n_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
  assert r["cache_gb_per_chip"] * 1e9 == kv / 4 + 8 * 128 / 2 + 4
  assert r["step_total_gb"] * 1e9 >= kv / 4  # the donated cache is part of the step
  assert r["total_gb"] >= r["step_total_gb"] and 0 < r["total_gb"] < 1
  assert r["hbm_bytes_per_chip"] > 0 and r["roofline_step_s"] > 0
  assert "decode step" in report(r)
