"""Parameter creation, logical axes and counting, without allocating when not needed."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.transformer import FlexOlmo

Params = Any


def _dummy_ids():
  return jnp.zeros((1, 1), jnp.int32)


def _init_boxed(cfg: ModelConfig, rng):
  return FlexOlmo(cfg).init(rng, _dummy_ids())["params"]


def abstract_params(cfg: ModelConfig, boxed: bool = False) -> Params:
  """ShapeDtypeStructs of every parameter (jax.eval_shape: nothing is allocated)."""
  tree = jax.eval_shape(lambda: _init_boxed(cfg, jax.random.key(0)))
  return tree if boxed else nn.meta.unbox(tree)


def param_logical_axes(cfg: ModelConfig) -> Params:
  """Tree of PartitionSpecs holding *logical* axis names ('layers', 'embed', 'exp', ...)."""
  return nn.get_partition_spec(abstract_params(cfg, boxed=True))


def init_params(cfg: ModelConfig, rng, shardings=None) -> Params:
  """Random-initialised params, created directly in their sharded layout when given."""
  fn = lambda key: nn.meta.unbox(_init_boxed(cfg, key))
  return jax.jit(fn, out_shardings=shardings)(rng)


def _is_expert_leaf(path) -> bool:
  keys = [getattr(k, "key", str(k)) for k in path]
  return "mlp" in keys and keys[-1] in ("gate_proj", "up_proj", "down_proj") and len(keys) >= 2


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Total and active parameter counts (active: top_k of num_experts expert FFNs run).

  `total_params` counts the architecture that a HuggingFace FlexOlmo checkpoint holds (the
  paper's count). The learned expert bias is a training-only scalar per expert and layer,
  dropped at merge time (FLEXOLMO.md section 1.3), so it is reported separately.
  """
  total = active = bias = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(cfg)):
    n = math.prod(leaf.shape)
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "router_bias":
      bias += n
      continue
    total += n
    if cfg.is_moe and _is_expert_leaf(path):
      active += n // cfg.num_experts * cfg.top_k
    else:
      active += n
  return {"total_params": int(total), "active_params": int(active), "bias_params": int(bias)}


def to_numpy(params: Params) -> Params:
  return jax.tree.map(np.asarray, params)
