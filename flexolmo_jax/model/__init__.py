"""Flax FlexOlmo model: config, modules, parameter helpers."""
from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.layers import KVCache
from flexolmo_jax.model.transformer import FlexOlmo, init_cache
from flexolmo_jax.model.params import (abstract_params, count_params, init_params,
                                       param_logical_axes)
from flexolmo_jax.model.expert_mask import expert_mask

__all__ = ["ModelConfig", "KVCache", "FlexOlmo", "init_cache", "abstract_params", "count_params",
           "init_params", "param_logical_axes", "expert_mask"]
