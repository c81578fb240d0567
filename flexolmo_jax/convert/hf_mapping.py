"""Tensor-level mapping between this project's params and HuggingFace state dicts.

Works on numpy arrays only (the core package never imports torch): callers turn torch
tensors into numpy (`t.float().numpy()`) or read safetensors with framework="np".

HF layouts understood (FLEXOLMO.md section 5):
  * on disk: `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight` (one per expert);
  * in memory (transformers >= 5): `mlp.experts.gate_up_proj` [E, 2I, d] (gate rows first)
    and `mlp.experts.down_proj` [E, d, I];
  * OLMo-2 dense: `mlp.{gate,up,down}_proj.weight`.
Every tensor is described once by a `TensorMap` (HF key, our path, per-slice transforms),
so the streaming file converters can move one tensor, layer or expert at a time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from flexolmo_jax.model.config import ModelConfig

Params = dict


class MappingError(ValueError):
  """A state dict does not match the model config (missing, unexpected or misshapen keys)."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  hf_key: str  # may contain {l} (layer) and {e} (expert)
  path: tuple[str, ...]  # our path; inside the decoder's layer subtree when per_layer
  per_layer: bool
  per_expert: bool
  to_ours: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> our slice (layer/expert)
  to_hf: Callable[[np.ndarray], np.ndarray]


def _t(x):
  return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
  d, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  ident = lambda x: np.ascontiguousarray(x)
  maps = [
      TensorMap("model.embed_tokens.weight", ("embed_tokens",), False, False, ident, ident),
      TensorMap("model.norm.weight", ("norm", "scale"), False, False, ident, ident),
      TensorMap("lm_head.weight", ("lm_head",), False, False, _t, _t),
  ]
  L = "model.layers.{l}."

  def proj_in(heads):  # HF [heads*D, d] <-> ours [d, heads, D]
    return (lambda x: np.ascontiguousarray(x.T.reshape(d, heads, D)),
            lambda x: np.ascontiguousarray(x.reshape(d, heads * D).T))

  def norm_heads(heads):
    return (lambda x: np.ascontiguousarray(x.reshape(heads, D)),
            lambda x: np.ascontiguousarray(x.reshape(heads * D)))

  maps += [
      TensorMap(L + "self_attn.q_proj.weight", ("self_attn", "q_proj"), True, False, *proj_in(H)),
      TensorMap(L + "self_attn.k_proj.weight", ("self_attn", "k_proj"), True, False, *proj_in(K)),
      TensorMap(L + "self_attn.v_proj.weight", ("self_attn", "v_proj"), True, False, *proj_in(K)),
      TensorMap(L + "self_attn.o_proj.weight", ("self_attn", "o_proj"), True, False,
                lambda x: np.ascontiguousarray(x.T.reshape(H, D, d)),
                lambda x: np.ascontiguousarray(x.reshape(H * D, d).T)),
      TensorMap(L + "self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), True, False,
                *norm_heads(H)),
      TensorMap(L + "self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), True, False,
                *norm_heads(K)),
      TensorMap(L + "post_attention_layernorm.weight", ("post_attention_layernorm", "scale"),
                True, False, ident, ident),
      TensorMap(L + "post_feedforward_layernorm.weight", ("post_feedforward_layernorm", "scale"),
                True, False, ident, ident),
  ]
  if cfg.is_moe:
    X = L + "mlp.experts.{e}."
    maps += [
        TensorMap(L + "mlp.gate.weight", ("mlp", "router"), True, False, ident, ident),
        TensorMap(X + "gate_proj.weight", ("mlp", "gate_proj"), True, True, _t, _t),
        TensorMap(X + "up_proj.weight", ("mlp", "up_proj"), True, True, _t, _t),
        TensorMap(X + "down_proj.weight", ("mlp", "down_proj"), True, True, _t, _t),
    ]
  else:
    maps += [
        TensorMap(L + f"mlp.{n}.weight", ("mlp", n), True, False, _t, _t)
        for n in ("gate_proj", "up_proj", "down_proj")
    ]
  return maps


def hf_keys(cfg: ModelConfig) -> list[str]:
  """All on-disk HF keys of a model with this config, in a stable order."""
  return [key for key, *_ in iter_slices(cfg)]


def iter_slices(cfg: ModelConfig) -> Iterator[tuple[str, TensorMap, int | None, int | None]]:
  """(hf_key, map, layer, expert) for every on-disk tensor: the unit of streaming."""
  for m in tensor_maps(cfg):
    layers = range(cfg.n_layers) if m.per_layer else [None]
    for l in layers:
      experts = range(cfg.num_experts) if m.per_expert else [None]
      for e in experts:
        yield m.hf_key.format(l=l, e=e), m, l, e


# --- where a slice lives in our param tree -------------------------------------------------

def layer_prefix(cfg: ModelConfig, layer: int | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Tree prefix and leading index of layer `layer` (scanned: stacked on axis 0)."""
  if layer is None:
    return (), ()
  if cfg.scan_layers:
    return ("decoder", "layers"), (layer,)
  return ("decoder", f"layers_{layer}"), ()


def param_location(cfg, m: TensorMap, layer, expert) -> tuple[tuple[str, ...], tuple[int, ...]]:
  prefix, index = layer_prefix(cfg, layer)
  if expert is not None:
    index = index + (expert,)
  return prefix + m.path, index


def expected_shape(cfg: ModelConfig, m: TensorMap) -> tuple[int, ...]:
  """Shape of one HF tensor for this map (per layer and per expert where applicable)."""
  d, H, K, D, I, V, E = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden,
                         cfg.vocab_size, cfg.num_experts)
  name = m.hf_key.rsplit(".", 2)[-2] if m.hf_key.endswith(".weight") else m.hf_key
  table = {
      "embed_tokens": (V, d), "lm_head": (V, d), "norm": (d,), "q_proj": (H * D, d),
      "k_proj": (K * D, d), "v_proj": (K * D, d), "o_proj": (d, H * D), "q_norm": (H * D,),
      "k_norm": (K * D,), "post_attention_layernorm": (d,), "post_feedforward_layernorm": (d,),
      "gate": (E, d), "gate_proj": (I, d), "up_proj": (I, d), "down_proj": (d, I),
  }
  return table[name]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


# --- whole-state-dict conversion (tests, small models); file converters stream instead ----

def _unfuse(state_dict: Mapping[str, Any], cfg: ModelConfig) -> Mapping[str, Any]:
  """Expand transformers' in-memory fused expert tensors into the on-disk per-expert keys."""
  fused = [k for k in state_dict if k.endswith("mlp.experts.gate_up_proj") or
           k.endswith("mlp.experts.down_proj")]
  if not fused:
    return state_dict
  out = {k: v for k, v in state_dict.items() if k not in fused}
  I = cfg.ffn_hidden
  for k in fused:
    base = k.rsplit(".", 1)[0]
    arr = np.asarray(state_dict[k])
    for e in range(arr.shape[0]):
      if k.endswith("gate_up_proj"):
        if arr.shape[1:] != (2 * I, cfg.d_model):
          raise MappingError(f"{k}: shape {arr.shape}, expected (E, {2 * I}, {cfg.d_model})")
        out[f"{base}.{e}.gate_proj.weight"] = arr[e, :I]
        out[f"{base}.{e}.up_proj.weight"] = arr[e, I:]
      else:
        out[f"{base}.{e}.down_proj.weight"] = arr[e]
  return out


def params_from_hf(state_dict: Mapping[str, Any], cfg: ModelConfig) -> Params:
  """HF state dict (numpy values; fused or per-expert experts) -> this project's params."""
  sd = _unfuse(state_dict, cfg)
  wanted = {key: (m, l, e) for key, m, l, e in iter_slices(cfg)}
  missing = [k for k in wanted if k not in sd]
  unexpected = [k for k in sd if k not in wanted and not k.endswith("rotary_emb.inv_freq")]
  if missing or unexpected:
    raise MappingError(f"state dict does not match the config: missing {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''}")
  params: Params = {}
  for key, (m, l, e) in wanted.items():
    arr = np.asarray(sd[key])
    if tuple(arr.shape) != expected_shape(cfg, m):
      raise MappingError(f"{key}: shape {tuple(arr.shape)}, expected {expected_shape(cfg, m)}")
    piece = m.to_ours(arr)
    path, index = param_location(cfg, m, l, e)
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    if path[-1] not in node:
      lead = ((cfg.n_layers,) if (l is not None and cfg.scan_layers) else ()) + (
          (cfg.num_experts,) if e is not None else ())
      node[path[-1]] = np.empty(lead + piece.shape, piece.dtype)
    node[path[-1]][index] = piece
  return params


def check_bias_exportable(params: Params, cfg: ModelConfig, drop_bias: bool = False) -> None:
  """HF FlexOlmo has no expert bias: refuse to export one that changes routing, unless told."""
  if not cfg.expert_bias:
    return
  biases = []
  if cfg.scan_layers:
    biases.append(np.asarray(params["decoder"]["layers"]["mlp"]["router_bias"]))
  else:
    biases += [np.asarray(params["decoder"][f"layers_{l}"]["mlp"]["router_bias"])
               for l in range(cfg.n_layers)]
  active = any(np.any(np.minimum(b[..., 1:], 0) != 0) for b in biases)
  if active and not drop_bias:
    raise MappingError(
        "this model has a learned expert bias (min(b, 0) < 0) that transformers' FlexOlmo "
        "cannot represent; exporting it would change routing. Pass drop_bias=True "
        "(--drop-bias) to export without it, knowing logits will differ.")


def params_to_hf(params: Params, cfg: ModelConfig, fused: bool = False,
                 drop_bias: bool = False) -> dict[str, np.ndarray]:
  """This project's params -> HF state dict (numpy). fused=True gives transformers' in-memory
  layout (for `load_state_dict`); the default is the on-disk per-expert layout."""
  check_bias_exportable(params, cfg, drop_bias)
  out: dict[str, np.ndarray] = {}
  for key, m, l, e in iter_slices(cfg):
    path, index = param_location(cfg, m, l, e)
    out[key] = m.to_hf(np.asarray(_get(params, path)[index]))
  if fused and cfg.is_moe:
    for l in range(cfg.n_layers):
      base = f"model.layers.{l}.mlp.experts"
      gate_up, down = [], []
      for e in range(cfg.num_experts):
        g = out.pop(f"{base}.{e}.gate_proj.weight")
        u = out.pop(f"{base}.{e}.up_proj.weight")
        gate_up.append(np.concatenate([g, u], axis=0))
        down.append(out.pop(f"{base}.{e}.down_proj.weight"))
      out[f"{base}.gate_up_proj"] = np.stack(gate_up)
      out[f"{base}.down_proj"] = np.stack(down)
  return out


# --- configs ------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """config.json contents for transformers (flex_olmo for MoE, olmo2 for dense)."""
  c: dict[str, Any] = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_token_id,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
      "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
      "rope_parameters": {"rope_theta": float(cfg.rope_theta), "rope_type": "default"},
      "initializer_range": cfg.init_std, "use_cache": True, "dtype": dtype,
  }
  if cfg.head_dim != cfg.d_model // cfg.n_heads:
    c["head_dim"] = cfg.head_dim
  if cfg.is_moe:
    c.update(model_type="flex_olmo", architectures=["FlexOlmoForCausalLM"],
             num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
             norm_topk_prob=cfg.norm_topk_prob, router_aux_loss_coef=0.0,
             output_router_logits=False, flexolmo_expert_names=list(cfg.names))
  else:
    c.update(model_type="olmo2", architectures=["Olmo2ForCausalLM"])
  return c


def model_config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a transformers config.json dict (flex_olmo or olmo2)."""
  model_type = hf.get("model_type")
  if model_type not in ("flex_olmo", "olmo2"):
    raise MappingError(f"unsupported model_type {model_type!r}; expected flex_olmo or olmo2")
  rope = hf.get("rope_parameters") or {}
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  if rope.get("rope_type", "default") != "default":
    raise MappingError(f"rope_type {rope.get('rope_type')!r} is not supported (only default)")
  if hf.get("tie_word_embeddings"):
    raise MappingError("tied embeddings are not supported (OLMo 2 unties them)")
  if hf.get("attention_bias"):
    raise MappingError("attention biases are not supported (OLMo 2 has none)")
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      ffn_hidden=hf["intermediate_size"], rope_theta=float(theta),
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      max_seq_len=hf.get("max_position_embeddings", 4096),
      eos_token_id=hf.get("eos_token_id") if hf.get("eos_token_id") is not None else 0,
      pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
      bos_token_id=hf.get("bos_token_id"),
  )
  if model_type == "flex_olmo":
    names = tuple(hf.get("flexolmo_expert_names") or ())
    fields.update(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)), expert_names=names)
  fields.update(overrides)
  return ModelConfig(**fields)
