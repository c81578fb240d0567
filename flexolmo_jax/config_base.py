"""Shared pieces of the ml_collections configs in configs/.

A config is a ConfigDict with (at least) `model` (fields of ModelConfig), `mesh` (axis sizes
for data/fsdp/expert/tensor; one may be -1) and `axis_rules` (logical name -> mesh axes).
Later stages (training, evaluation) add their own blocks.
"""
from __future__ import annotations

import math

import ml_collections

from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.parallel.sharding import DEFAULT_RULES

# OLMo 2 7B (FLEXOLMO.md section 2); dolma2 tokenizer padded to 100,352.
OLMO2_7B = dict(
    vocab_size=100_352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
    ffn_hidden=11_008, rope_theta=500_000.0, norm_eps=1e-6, max_seq_len=4096,
    eos_token_id=100_257, pad_token_id=100_277,
    # Chunked LM head + loss: blocks of [B, 1024] positions (4 per 4096-token row). Full fp32
    # logits of 2 rows/chip are 2 x 4096 x 100,352 x 4 B = 3.3 GB, and as much again for their
    # gradient; a block is 0.8 GB. Its 2048 tokens/chip give the head matmul ~2000 flops per
    # weight byte (v5p's ridge: ~170), so re-reading the head once per block costs no time.
    logits_chunk=1024,
)

# FlexMix domains (paper section 6), slot order after the public expert.
FLEXMIX_DOMAINS = ("news", "creative", "code", "academic", "educational", "math", "reddit")


def model_block(**fields) -> ml_collections.ConfigDict:
  """A `model` block with every ModelConfig field present, so any can be overridden by flag."""
  defaults = ModelConfig(**{k: fields[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads")},
                         eos_token_id=fields.get("eos_token_id", 0),
                         pad_token_id=fields.get("pad_token_id", 0)).to_dict()
  defaults.update(n_kv_heads=None, head_dim=None)
  defaults.update(fields)
  defaults["expert_names"] = list(fields.get("expert_names", ()))
  cd = ml_collections.ConfigDict(defaults)
  return cd


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  config.axis_rules = [list(r) for r in DEFAULT_RULES]
  return config


def moe_fields(names, top_k: int, **kw) -> dict:
  names = tuple(names)
  return dict(num_experts=len(names), top_k=top_k, expert_names=list(names), **kw)


def model_config(config) -> ModelConfig:
  """The frozen ModelConfig of a full ml_collections config (or of its model block)."""
  block = config.model if "model" in config else config
  d = block.to_dict() if hasattr(block, "to_dict") else dict(block)
  d["expert_names"] = tuple(d.get("expert_names") or ())
  return ModelConfig.from_dict(d)


def step_model_config(config) -> ModelConfig:
  """The ModelConfig the training step runs: the model block, except in router tuning, which
  runs top-k = `train.tuning_top_k` (0: every expert, as the reference tunes; dense dispatch)
  while the exported and evaluated model keeps the configured (inference) top-k."""
  cfg = model_config(config)
  if config.get("stage") != "router" or not cfg.is_moe:
    return cfg
  k = int(config.train.get("tuning_top_k", 0) or cfg.num_experts)
  if not 1 <= k <= cfg.num_experts:
    raise ValueError(f"train.tuning_top_k {k} must be in [1, num_experts={cfg.num_experts}] "
                     f"(0: all experts)")
  return cfg.replace(top_k=k, dispatch="dense" if k == cfg.num_experts else cfg.dispatch)


# What trains in each stage (regexes over parameter paths; expert slots where stacked).
STAGE_TRAINABLE = {
    "public": ([".*"], None),
    "expert": (["mlp/(gate_proj|up_proj|down_proj|router|router_bias)$"], [1]),
    "router": (["mlp/(router|router_bias)$"], None),
    # Baselines (configs/flexmix_mini.py): every parameter trains. btx fine-tunes a stitched
    # model (init.params) on everyone's data, as Branch-Train-MiX does; unrestricted trains
    # the same MoE from random init on all data at the lifecycle's FLOPs.
    "btx": ([".*"], None),
    "unrestricted": ([".*"], None),
}


def add_training(config: ml_collections.ConfigDict, stage: str, **train) -> ml_collections.ConfigDict:
  """Adds stage, train, data, init, checkpoint and eval blocks (FLEXOLMO.md section 1 defaults)."""
  if stage not in STAGE_TRAINABLE:
    raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_TRAINABLE)}")
  trainable, experts = STAGE_TRAINABLE[stage]
  config.stage = stage
  config.seed = 0
  tc = dict(
      steps=1000, global_batch_size=8, seq_len=512, grad_accum_steps=1,
      lr=9e-4, warmup_steps=2000, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.0, clip=1.0,
      router_z_loss=1e-3, output_z_loss=1e-5, load_balance=0.0,
      # The expert bias trains as theta with bias = -softplus(theta): never positive, never
      # without a gradient (the reference's min(b, 0) stops learning where b > 0; "min"
      # trains b itself). bias_init: a new expert's effective bias, -softplus(0) = -log 2.
      bias_parametrization="softplus", bias_init=-math.log(2.0),
      trainable=trainable, trainable_experts=ml_collections.FieldReference(experts, field_type=list),
      log_every=10, peak_flops_per_device=0.0,
  )
  if stage == "router":  # router tuning (paper section 1.4; reference OLMoE-7x7B.py)
    # Every router row (the public one too) and the bias train, all experts active
    # (tuning_top_k 0 = E); the export keeps model.top_k for inference.
    tc.update(lr=2e-3, warmup_steps=100, weight_decay=0.1, tuning_top_k=0)
  tc.update(train)
  config.train = ml_collections.ConfigDict(tc)
  # root: relative source/tokenizer paths resolve against it (train.trainer.data_path);
  # sources: (name, weight) pairs; a tuple so `--config.data.sources="[('math', 1.0)]"` works
  config.data = ml_collections.ConfigDict(dict(root="", sources=(), tokenizer="", num_threads=2))
  config.init = ml_collections.ConfigDict(dict(params="", public="", public_embedding="",
                                               domain_embedding=""))
  # preemption_check_every: multi-host runs agree on SIGTERM every N steps. Each check is an
  # all-gather whose result the host waits for, i.e. a point where dispatch stops running
  # ahead of the device: not every step. A TPU VM's notice leaves ~30 s, many steps.
  config.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True,
                                                     preemption_check_every=10))
  # at_end: the validation loss of every eval source after the last step (summary.json).
  # Off where the caller evaluates the export itself anyway (the demo, on every domain).
  config.eval = ml_collections.ConfigDict(dict(sources={}, global_batch_size=8, at_end=True))
  config.export = True
  return config
