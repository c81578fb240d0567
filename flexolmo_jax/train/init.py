"""Initial parameters for each stage.

  public  random init, or `init.params` (a model directory, e.g. an imported OLMo-2 7B)
  expert  from the public model directory `init.public`: expert 0 = public FFN, expert 1 = a
          copy of it, router rows = [public embedding, domain embedding] in every layer,
          expert bias `train.bias_init` (-log 2 = -softplus(0) by default; the two experts
          are equal, so training starts exactly at the public model whatever the bias)
  router  `init.params`: a stitched N-expert model directory
  btx     `init.params`: a stitched N-expert model directory (every parameter then trains)
  unrestricted  random init of the configured MoE (no public model), or `init.params`
"""
from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.storage import model_io
from flexolmo_jax.storage.paths import as_path
from flexolmo_jax.model import ModelConfig, init_params

FFN_KEYS = ("gate_proj", "up_proj", "down_proj")


class InitError(ValueError):
  pass


def load_embedding(path, d_model: int, what: str) -> np.ndarray:
  p = as_path(path) if str(path) else None
  if p is None or not p.is_file():
    raise InitError(f"{what} embedding file {str(path)!r} not found (make it with "
                    f"python -m flexolmo_jax.router_init)")
  with p.open("rb") as f:
    v = np.load(f)
  if v.shape != (d_model,):
    raise InitError(f"{what} embedding {p} has shape {v.shape}, the model needs ({d_model},): "
                    f"use an embedder whose width equals d_model, or --embedder=self")
  if not np.all(np.isfinite(v)):
    raise InitError(f"{what} embedding {p} holds non-finite values")
  return v.astype(np.float32)


def expert_from_public(public_params, public_cfg: ModelConfig, cfg: ModelConfig,
                       r_public: np.ndarray, r_domain: np.ndarray, bias_init: float = 0.0):
  """Build the 2-expert training model from the dense public model's params."""
  if public_cfg.is_moe:
    raise InitError("init.public must be a dense public model (num_experts == 0)")
  if cfg.num_experts != 2 or cfg.top_k != 2:
    raise InitError(f"expert stage expects 2 experts with top-2, config has "
                    f"{cfg.num_experts} / top-{cfg.top_k}")
  dense_view = cfg.replace(num_experts=0, top_k=1, expert_bias=False, expert_names=())
  if not model_io.same_architecture(dense_view, public_cfg.replace(scan_layers=cfg.scan_layers)):
    raise InitError(f"public model architecture {model_io._arch(public_cfg)} does not match the "
                    f"expert config {model_io._arch(dense_view)}")
  layers = public_params["decoder"]["layers"]
  mlp = layers["mlp"]
  L = cfg.n_layers
  moe = {k: jnp.stack([mlp[k], mlp[k]], axis=1) for k in FFN_KEYS}  # [L, 2, ...]
  router = np.stack([r_public, r_domain])[None].repeat(L, axis=0)  # [L, 2, d]
  moe["router"] = jnp.asarray(router, dtype=mlp["gate_proj"].dtype)
  if cfg.expert_bias:
    if bias_init > 0:
      raise InitError(f"train.bias_init {bias_init} must be <= 0 (an effective bias)")
    # Effective values (<= 0), as a model directory stores them; slot 0 (public) is never used.
    moe["router_bias"] = jnp.asarray([[0.0, bias_init]] * L, mlp["gate_proj"].dtype)
  new_layers = dict(layers, mlp=moe)
  return dict(public_params, decoder=dict(public_params["decoder"], layers=new_layers))


def fingerprint(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def frozen_source(config) -> str | None:
  """The model directory the stage's frozen leaves are rebuilt from on every start, if any."""
  ic = config.init
  if config.stage == "expert":
    return str(ic.public) or None
  if config.stage in ("public", "router", "btx", "unrestricted"):
    return str(ic.params) or None
  return None


def initial_params(config, cfg: ModelConfig, shardings, rng, mesh=None, rules=None):
  """Returns (params, provenance dict). Params are placed in `shardings` (on `mesh`)."""
  stage = config.stage
  ic = config.init
  if stage in ("public", "unrestricted"):
    if ic.params:
      return model_io.load_params(ic.params, cfg, shardings), {
          "from": str(ic.params), "meta": model_io.read_meta(ic.params)}
    return init_params(cfg, rng, shardings), {"from": "random", "seed": int(config.seed)}
  if stage == "expert":
    if not ic.public:
      raise InitError("expert stage needs config.init.public (the public model directory)")
    from flexolmo_jax.parallel import param_shardings
    public_cfg = model_io.read_config(ic.public).replace(scan_layers=True)
    r_pub = load_embedding(ic.public_embedding, cfg.d_model, "public")
    r_dom = load_embedding(ic.domain_embedding, cfg.d_model, "domain")
    # Restore the public model straight into its sharded layout, then build the experts on
    # device: no host ever holds the whole model.
    public_sh = param_shardings(public_cfg, mesh, rules) if mesh is not None else None
    public_params = model_io.load_params(ic.public, public_cfg, public_sh)
    bias_init = float(config.train.get("bias_init", 0.0))
    build = lambda p: expert_from_public(p, public_cfg, cfg, r_pub, r_dom, bias_init)
    params = jax.jit(build, out_shardings=shardings)(public_params)
    return params, {"from": str(ic.public), "public_meta": model_io.read_meta(ic.public),
                    "public_embedding": str(ic.public_embedding),
                    "domain_embedding": str(ic.domain_embedding),
                    "embedding_sha": fingerprint(r_pub.tolist(), r_dom.tolist())}
  if stage in ("router", "btx"):
    if not ic.params:
      raise InitError(f"{stage} stage needs config.init.params (a stitched model directory)")
    return model_io.load_params(ic.params, cfg, shardings), {
        "from": str(ic.params), "meta": model_io.read_meta(ic.params)}
  raise InitError(f"unknown stage {stage!r}: public, expert, router, btx or unrestricted")
