"""Parity with HuggingFace transformers FlexOlmo / OLMo-2 (PyTorch, fp32), both directions."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402

from flexolmo_jax.convert import hf_mapping  # noqa: E402
from model_utils import forward, random_params  # noqa: E402

# (layers, heads, kv heads, d_model, experts, top_k, norm_topk_prob, vocab): odd vocabularies,
# GQA and not, 1 and >= 3 layers, k from 1 to E.
MOE_CASES = [
    (1, 2, 2, 32, 2, 1, False, 97),
    (3, 4, 2, 32, 4, 2, True, 131),
    (3, 8, 8, 64, 8, 8, False, 101),
    (1, 6, 3, 48, 3, 3, True, 77),
    (4, 4, 1, 32, 5, 4, False, 67),
    (3, 2, 1, 16, 6, 1, True, 53),
]
DENSE_CASES = [(1, 2, 2, 32, 97), (3, 4, 2, 32, 131), (3, 8, 4, 64, 61)]
TOL = 1e-4


def _randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("mlp.gate.weight"):
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _hf_flex(L, H, K, d, E, k, norm, V, seed):
  c = transformers.FlexOlmoConfig(
      vocab_size=V, hidden_size=d, intermediate_size=2 * d - 8, num_hidden_layers=L,
      num_attention_heads=H, num_key_value_heads=K, num_experts=E, num_experts_per_tok=k,
      norm_topk_prob=norm, pad_token_id=0, eos_token_id=1, bos_token_id=None,
      rope_parameters={"rope_theta": 10_000.0, "rope_type": "default"})
  torch.manual_seed(seed)
  return _randomise(transformers.FlexOlmoForCausalLM(c), seed)


def _hf_olmo2(L, H, K, d, V, seed):
  c = transformers.Olmo2Config(
      vocab_size=V, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=L,
      num_attention_heads=H, num_key_value_heads=K, pad_token_id=0, eos_token_id=1,
      bos_token_id=None, rope_parameters={"rope_theta": 500_000.0, "rope_type": "default"})
  torch.manual_seed(seed)
  return _randomise(transformers.Olmo2ForCausalLM(c), seed)


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def _state_dict_np(model):
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _ids(V, seed, shape=(2, 13)):
  return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def _cfg_from(model, **kw):
  return hf_mapping.model_config_from_hf(model.config.to_dict(), dtype="float32", **kw)


@pytest.mark.parametrize("case", MOE_CASES)
def test_flexolmo_logits_match_transformers(case):
  seed = sum(case[:6])
  hf = _hf_flex(*case, seed=seed)
  ids = _ids(case[-1], seed)
  ref = _hf_logits(hf, ids)
  sd = _state_dict_np(hf)
  for mode in ("dense", "capacity", "dropless"):
    cfg = _cfg_from(hf, dispatch=mode, capacity_factor=case[4] / case[5])
    params = hf_mapping.params_from_hf(sd, cfg)
    ours, _ = forward(cfg, params, ids)
    assert np.abs(ours - ref).max() <= TOL, (mode, np.abs(ours - ref).max())


@pytest.mark.parametrize("case", DENSE_CASES)
def test_olmo2_logits_match_transformers(case):
  hf = _hf_olmo2(*case, seed=7)
  ids = _ids(case[-1], 7)
  cfg = _cfg_from(hf)
  assert not cfg.is_moe
  params = hf_mapping.params_from_hf(_state_dict_np(hf), cfg)
  ours, _ = forward(cfg, params, ids)
  assert np.abs(ours - _hf_logits(hf, ids)).max() <= TOL


@pytest.mark.parametrize("case", [MOE_CASES[1], MOE_CASES[4]])
def test_export_to_transformers_in_memory_and_on_disk(case, tmp_path):
  L, H, K, d, E, k, norm, V = case
  hf_template = _hf_flex(*case, seed=1)
  cfg = _cfg_from(hf_template)
  params = random_params(cfg, seed=5)
  ids = _ids(V, 3)
  ours, _ = forward(cfg, params, ids)

  # In-memory (fused experts) layout, strict load.
  fused = hf_mapping.params_to_hf(params, cfg, fused=True)
  hf_template.load_state_dict({k_: torch.from_numpy(v.copy()) for k_, v in fused.items()}, strict=True)
  assert np.abs(_hf_logits(hf_template, ids) - ours).max() <= TOL

  # On-disk layout + our config.json, loaded by AutoModelForCausalLM offline.
  save_file(hf_mapping.params_to_hf(params, cfg), str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(hf_mapping.hf_config(cfg)))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(loaded).__name__ == "FlexOlmoForCausalLM"
  assert np.abs(_hf_logits(loaded, ids) - ours).max() <= TOL
  # The expert names travel in config.json.
  assert hf_mapping.model_config_from_hf(json.loads((tmp_path / "config.json").read_text())).names == cfg.names


def test_dense_export_loads_as_olmo2(tmp_path):
  hf = _hf_olmo2(3, 4, 2, 32, 89, seed=2)
  cfg = _cfg_from(hf)
  params = random_params(cfg, seed=9)
  save_file(hf_mapping.params_to_hf(params, cfg), str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(hf_mapping.hf_config(cfg)))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(loaded).__name__ == "Olmo2ForCausalLM"
  ids = _ids(89, 4)
  ours, _ = forward(cfg, params, ids)
  assert np.abs(_hf_logits(loaded, ids) - ours).max() <= TOL


@pytest.mark.parametrize("case", [MOE_CASES[2], MOE_CASES[3]])
def test_round_trip_is_bitwise(case):
  hf = _hf_flex(*case, seed=11)
  sd = _state_dict_np(hf)
  cfg = _cfg_from(hf)
  params = hf_mapping.params_from_hf(sd, cfg)
  for fused in (True, False):
    back = hf_mapping.params_to_hf(params, cfg, fused=fused)
    if fused:
      assert set(back) == set(sd)
      for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])
    again = hf_mapping.params_from_hf(back, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)
  # Unscanned layout maps to the same tensors.
  flat_cfg = cfg.replace(scan_layers=False)
  flat = hf_mapping.params_from_hf(sd, flat_cfg)
  last = cfg.n_layers - 1
  np.testing.assert_array_equal(flat["decoder"][f"layers_{last}"]["self_attn"]["q_proj"],
                                params["decoder"]["layers"]["self_attn"]["q_proj"][last])
  ids = _ids(case[-1], 1)
  np.testing.assert_allclose(forward(flat_cfg, flat, ids)[0], forward(cfg, params, ids)[0],
                             atol=1e-5)


def test_mapping_rejects_bad_state_dicts():
  hf = _hf_flex(*MOE_CASES[1], seed=0)
  sd = _state_dict_np(hf)
  cfg = _cfg_from(hf)
  broken = dict(sd)
  broken.pop("model.layers.2.self_attn.k_proj.weight")
  with pytest.raises(hf_mapping.MappingError, match="missing.*layers.2.self_attn.k_proj"):
    hf_mapping.params_from_hf(broken, cfg)
  broken = dict(sd, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(hf_mapping.MappingError, match="q_proj.*shape"):
    hf_mapping.params_from_hf(broken, cfg)
  with pytest.raises(hf_mapping.MappingError, match="unexpected"):
    hf_mapping.params_from_hf(dict(sd, extra=np.zeros(1)), cfg)
  with pytest.raises(hf_mapping.MappingError, match="model_type"):
    hf_mapping.model_config_from_hf({"model_type": "llama"})


def test_learned_bias_is_not_silently_exported():
  hf = _hf_flex(*MOE_CASES[1], seed=0)
  cfg = _cfg_from(hf, expert_bias=True)
  params = random_params(cfg)
  params["decoder"]["layers"]["mlp"]["router_bias"] = params["decoder"]["layers"]["mlp"][
      "router_bias"].at[:, 1].set(-0.5)
  with pytest.raises(hf_mapping.MappingError, match="bias"):
    hf_mapping.params_to_hf(params, cfg)
  out = hf_mapping.params_to_hf(params, cfg, drop_bias=True)
  assert not any("bias" in k for k in out)
  # A non-negative bias has no effect (min(b, 0) == 0), so it exports exactly.
  params["decoder"]["layers"]["mlp"]["router_bias"] = abs(params["decoder"]["layers"]["mlp"]["router_bias"])
  hf_mapping.params_to_hf(params, cfg)
