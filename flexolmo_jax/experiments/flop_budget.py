"""Training-FLOP budgets of whole lifecycles, for baselines compared at equal compute.

The unrestricted-MoE baseline (configs/flexmix_mini.py:unrestricted) trains the merged
model's architecture from random init on all data for as many steps as make its training
FLOPs equal those of the FlexOlmo lifecycle it is compared with: the public model, every
expert, and (if it ran) router tuning.

Each stage is counted by what its step executes under the project's model-FLOP definition
(model/flops.py, `executed_train_flops`): forward, activation gradients through every
layer, and weight gradients of the trainable parameters only. An expert stage therefore
costs less than 6 N per token (its attention, embeddings, head and public expert are
frozen), router tuning runs every expert (top-k = E, `config_base.step_model_config`) but
differentiates only the router; a stage where everything trains is the usual 6 N. Not
counted: sampling the router-tuning proxies (inference), evaluation, capacity padding.

Against what XLA compiles (its cost analysis of the tiny stage steps, one CPU device,
normalised by the public step): expert 0.71 of the public step, counted here 0.76, the 6N
convention 1.08; router tuning 0.75 / 0.84 / 1.24. The compiled step also drops activation
gradients that no trainable leaf needs (below layer 0's FFN; through the last layer's
experts in router tuning), which matters at 2 layers and little at 32, so the lifecycle is
slightly over-counted and the unrestricted model gets slightly more, never fewer, FLOPs.
"""
from __future__ import annotations

from typing import Mapping

from flexolmo_jax import config_base
from flexolmo_jax.model.flops import executed_train_flops, weight_flops_by_leaf
from flexolmo_jax.train.partition import Partition, config_partition


def trained_fractions(partition: Partition, cfg) -> dict[str, float]:
  """{matmul leaf name: share of its forward FLOPs whose weight gradient is computed}:
  1 trainable, 0 frozen, s / E for s of E expert slots training (`executed_train_flops`)."""
  names = weight_flops_by_leaf(cfg)
  out: dict[str, float] = {}
  for key, rule in partition.rules:
    name = key.rsplit("/", 1)[-1]
    if name not in names:  # norms, the embedding lookup, the bias: no matmul FLOPs
      continue
    if not rule.trainable:
      frac = 0.0
    elif rule.slots is None:
      frac = 1.0
    else:
      frac = len(rule.slots) / rule.size
    if name in out and out[name] != frac:
      raise ValueError(f"leaves named {name!r} train differently ({key}); cannot count them")
    out[name] = frac
  return out


def step_flops(config) -> float:
  """Training FLOPs of one optimizer step of a stage config (all microbatches)."""
  cfg = config_base.step_model_config(config)
  tc = config.train
  fractions = trained_fractions(config_partition(config, cfg), cfg)
  return executed_train_flops(cfg, int(tc.global_batch_size), int(tc.seq_len), fractions)


def stage_flops(config) -> float:
  """Training FLOPs of a whole stage: `train.steps` x `step_flops`."""
  return int(config.train.steps) * step_flops(config)


def lifecycle_flops(configs: Mapping[str, object]) -> dict[str, float]:
  """{stage name: its training FLOPs} for every config of a lifecycle (e.g.
  configs/flexmix_mini.py `lifecycle_configs`); sum the values for the budget."""
  return {name: stage_flops(c) for name, c in configs.items()}


def matched_steps(budget: float, config) -> int:
  """Steps of `config` whose training FLOPs come closest to `budget` (within half a step)."""
  per_step = step_flops(config)
  if budget <= 0 or per_step <= 0:
    raise ValueError(f"budget {budget} and step FLOPs {per_step} must be positive")
  return max(1, int(round(budget / per_step)))
