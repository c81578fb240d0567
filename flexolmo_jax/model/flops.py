"""Model FLOPs (useful work only: capacity padding and recomputation are not counted)."""
from __future__ import annotations

from flexolmo_jax.model.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  d, I = cfg.d_model, cfg.ffn_hidden
  q = cfg.n_heads * cfg.head_dim
  kv = cfg.n_kv_heads * cfg.head_dim
  experts_run = cfg.top_k if cfg.is_moe else 1
  per_layer = (2 * d * (2 * q + 2 * kv)  # q and o, k and v projections
               + 2 * 2 * seq_len * q  # scores and weighted values (full square, as usual)
               + 2 * 3 * d * I * experts_run  # SwiGLU experts that run
               + 2 * d * cfg.num_experts)  # router
  return float(cfg.n_layers * per_layer + 2 * d * cfg.vocab_size)  # + lm_head


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  return forward_flops_per_token(cfg, seq_len) * batch * seq_len


def train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """The MFU convention: forward + backward = 3x forward, whatever is frozen."""
  return 3.0 * forward_flops(cfg, batch, seq_len)

