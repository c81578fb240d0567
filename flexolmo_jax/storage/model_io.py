"""Model directories: the unit that training exports, the stitcher writes and tools load.

    DIR/
      params/            orbax PyTree checkpoint of the full parameter tree (scanned layout)
      model_config.json  ModelConfig fields (expert names in slot order)
      meta.json          provenance: stage, step, sources, ... (free-form)
      manifest.json      (stitched models) expert slots, sources, sha256 of every tensor/slot
      tokenizer/         (optional) tokenizer files, carried from an HF import to exports

Built in `.DIR.partial`, moved into place and sealed last (storage.atomic): a directory without
the seal is incomplete (a killed copy onto an object store) and every reader here refuses it.
DIR may be any etils.epath path (local or gs://); orbax and tensorstore are given that path.
DIR/params is an orbax checkpoint however the directory was made: training exports save
jax.Arrays with orbax's ArrayHandler, the stitcher and the converters stream numpy leaves
through orbax (param_store.ParamWriter); both restore with plain orbax calls.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from etils import epath

from flexolmo_jax.storage import atomic, param_store
from flexolmo_jax.storage.paths import as_path
from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.params import abstract_params

CONFIG_FILE = "model_config.json"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"  # optional: tokenizer files carried from an HF import to exports


class ModelDirError(ValueError):
  pass


def looks_like_model_dir(path) -> bool:
  """Has the files of a model directory (complete or not: see `is_model_dir`)."""
  p = as_path(path)
  return (p / CONFIG_FILE).is_file() and (p / PARAMS_DIR).is_dir()


# Written into model_config.json by every writer since seals exist: such a directory without
# its seal is an unfinished publish (e.g. a copy onto a bucket cut short). A directory without
# the key predates seals; it was published by one local rename, so it is complete as it is.
SEALED_KEY = "published_with_seal"


def config_json(cfg: ModelConfig) -> str:
  """model_config.json's text: the config's fields and the seal marker."""
  return json.dumps(dict(cfg.to_dict(), **{SEALED_KEY: True}), indent=1)


def _needs_seal(p: epath.Path) -> bool:
  try:
    return bool(json.loads((p / CONFIG_FILE).read_text()).get(SEALED_KEY))
  except ValueError:
    return True  # unreadable config: treat as unfinished


def is_model_dir(path) -> bool:
  """A finished model directory: its files and the seal its writer adds last (directories
  written before seals existed have neither marker nor seal and are complete)."""
  p = as_path(path)
  return looks_like_model_dir(p) and (atomic.is_sealed(p) or not _needs_seal(p))


def require_complete(path) -> epath.Path:
  """`path` if it is a finished model directory, else a ModelDirError naming what is wrong."""
  p = as_path(path)
  if not (p / CONFIG_FILE).is_file():
    raise ModelDirError(f"{p} is not a model directory (no {CONFIG_FILE})")
  if not atomic.is_sealed(p):
    if _needs_seal(p):
      atomic.require_sealed(p, ModelDirError, "model directory")
    logging.info("%s has no seal: written before seals existed, accepted as complete", p)
  return p


def read_config(path) -> ModelConfig:
  p = require_complete(path)
  d = json.loads((p / CONFIG_FILE).read_text())
  d.pop(SEALED_KEY, None)
  d["expert_names"] = tuple(d.get("expert_names") or ())
  return ModelConfig.from_dict(d)


def read_meta(path) -> dict[str, Any]:
  f = as_path(path) / META_FILE
  return json.loads(f.read_text()) if f.is_file() else {}


def save_model_dir(path, params, cfg: ModelConfig, meta: dict[str, Any] | None = None,
                   overwrite: bool = False) -> epath.Path:
  """Write params + config + meta atomically (all processes call this in multi-host runs)."""
  out = as_path(path)
  primary = jax.process_index() == 0
  with atomic.staged_directory(out, overwrite, error=ModelDirError, primary=primary) as tmp:
    ckptr = ocp.PyTreeCheckpointer()
    # One layer (and expert) per stored chunk, so tools can stream the model (param_store).
    ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(
        params, save_args=param_store.layer_chunking(cfg, params)))
    if primary:
      (tmp / CONFIG_FILE).write_text(config_json(cfg))
      (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=1, default=str))
  return out


def load_params(path, cfg: ModelConfig | None = None, shardings=None):
  """Restore the params of a model directory (optionally straight into `shardings`)."""
  p = as_path(path)
  saved = read_config(p)
  if cfg is not None and _arch(saved) != _arch(cfg):
    raise ModelDirError(f"{p}: model config does not match: saved {_arch(saved)}, "
                        f"expected {_arch(cfg)}")
  cfg = cfg or saved
  target = abstract_params(cfg)
  if shardings is None:  # one local device; callers that shard pass `shardings`
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=one, dtype=x.dtype), target)
  else:
    restore_args = jax.tree.map(lambda x, s: ocp.ArrayRestoreArgs(sharding=s, dtype=x.dtype),
                                target, shardings)
  try:
    return ocp.PyTreeCheckpointer().restore(
        p / PARAMS_DIR, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
  except Exception as e:  # orbax raises many types for corrupt/partial files
    raise ModelDirError(f"cannot read params of {p}: {type(e).__name__}: {e}") from e


def _arch(cfg: ModelConfig) -> dict[str, Any]:
  """Fields that fix parameter shapes (dispatch, dtype, names may differ)."""
  keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
          "ffn_hidden", "num_experts", "expert_bias", "scan_layers")
  return {k: getattr(cfg, k) for k in keys}


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
  return _arch(a) == _arch(b)
