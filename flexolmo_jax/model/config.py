"""Static model configuration.

The ml_collections config (configs/*.py) is what users edit; `ModelConfig` is the frozen,
hashable view of its `model` block that Flax modules and jitted functions close over.
One dataclass describes the dense public model (num_experts == 0), the 2-expert training
model and the N-expert merged model: stages differ by config, not by code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

DISPATCH_MODES = ("dense", "capacity", "dropless")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")
ATTENTION_IMPLS = ("xla", "chunked", "splash", "cudnn")
GROUPED_MATMULS = ("auto", "ragged_dot", "megablox", "tiled", "select")
MOE_TRANSPORTS = ("auto", "ragged", "all_to_all")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
  head_dim: int | None = None  # None: d_model // n_heads
  ffn_hidden: int = 0
  rope_theta: float = 500_000.0
  norm_eps: float = 1e-6
  max_seq_len: int = 4096
  # Mixture of experts. num_experts == 0 gives the dense OLMo-2 block (plain SwiGLU).
  num_experts: int = 0
  top_k: int = 1
  norm_topk_prob: bool = False
  # Learned per-expert bias min(b, 0) on non-public experts (slot 0 is the public expert).
  expert_bias: bool = False
  expert_names: tuple[str, ...] = ()
  dispatch: str = "dense"
  capacity_factor: float = 1.25
  capacity_impl: str = "auto"  # einsum | gather | auto (einsum on TPU, gather elsewhere)
  grouped_matmul: str = "auto"  # dropless kernel: auto | ragged_dot | megablox | tiled | select
  # Expert-parallel dropless token exchange (mesh expert axis > 1): auto (all_to_all on CPU,
  # which has no ragged kernel; ragged elsewhere) | ragged (ragged_all_to_all) | all_to_all.
  moe_transport: str = "auto"
  # Kernels. Every choice is a field here (never global state), so a config says exactly
  # what runs; "auto" choices follow `platform`, which the AOT planner sets to "tpu".
  platform: str = "auto"  # auto (the backend the program runs on) | cpu | gpu | tpu
  attention: str = "xla"  # xla (exact reference) | chunked | splash (TPU) | cudnn (GPU)
  attention_chunk: int = 512  # key/query block of the chunked and splash kernels
  # Packed rows attend across document boundaries by default, as the reference trains; True:
  # each document only to itself (segments end after every eos_token_id).
  document_mask: bool = False
  # Chunked LM head + loss (train/losses.py): sequence positions per block; a block is
  # [batch, logits_chunk] tokens, all rows (the batch stays sharded). 0: full logits.
  logits_chunk: int = 0
  # Numerics and compilation.
  dtype: str = "bfloat16"  # matmul operand / activation dtype
  param_dtype: str = "float32"
  init_std: float = 0.02
  scan_layers: bool = True
  scan_unroll: int = 1  # layers per scan iteration (same maths; the AOT planner's FLOP count)
  remat_policy: str = "none"
  # Token ids (HF config needs them inside the vocabulary).
  eos_token_id: int = 0
  pad_token_id: int = 0
  bos_token_id: int | None = None

  def __post_init__(self):
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    object.__setattr__(self, "expert_names", tuple(self.expert_names))
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
    if self.num_experts < 0:
      raise ValueError("num_experts must be >= 0")
    if self.num_experts:
      if not 1 <= self.top_k <= self.num_experts:
        raise ValueError(f"top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
      if self.expert_names and len(self.expert_names) != self.num_experts:
        raise ValueError(
            f"{len(self.expert_names)} expert_names {self.expert_names} for {self.num_experts} experts")
      if len(set(self.expert_names)) != len(self.expert_names):
        raise ValueError(f"duplicate expert names: {self.expert_names}")
    if self.dispatch not in DISPATCH_MODES:
      raise ValueError(f"dispatch {self.dispatch!r} not in {DISPATCH_MODES}")
    if self.capacity_impl not in ("auto", "einsum", "gather"):
      raise ValueError(f"capacity_impl {self.capacity_impl!r} not in (auto, einsum, gather)")
    for name, allowed in (("platform", PLATFORMS), ("attention", ATTENTION_IMPLS),
                          ("grouped_matmul", GROUPED_MATMULS),
                          ("moe_transport", MOE_TRANSPORTS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} {getattr(self, name)!r} not in {allowed}")
    if self.attention_chunk < 1 or self.logits_chunk < 0:
      raise ValueError(f"attention_chunk {self.attention_chunk} must be >= 1 and logits_chunk "
                       f"{self.logits_chunk} >= 0")
    if not 1 <= self.scan_unroll:
      raise ValueError(f"scan_unroll {self.scan_unroll} must be >= 1")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
    for name in ("eos_token_id", "pad_token_id"):
      if not 0 <= getattr(self, name) < self.vocab_size:
        raise ValueError(f"{name}={getattr(self, name)} outside vocabulary of {self.vocab_size}")

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def kernel_platform(self) -> str:
    """The platform kernels are chosen for: `platform`, or the default backend for "auto"."""
    if self.platform != "auto":
      return self.platform
    import jax  # only here: the config module itself stays importable without a backend
    return jax.default_backend()

  @property
  def names(self) -> tuple[str, ...]:
    """Expert names in slot order (defaults: public, expert1, ...)."""
    if self.expert_names:
      return self.expert_names
    return ("public",) + tuple(f"expert{i}" for i in range(1, self.num_experts))

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """From a plain dict or an ml_collections ConfigDict; unknown keys are an error."""
    if hasattr(d, "to_dict"):
      d = d.to_dict()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown model config keys: {unknown}")
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["expert_names"] = list(self.names) if self.is_moe else []
    return d
