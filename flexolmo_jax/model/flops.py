r"""Model FLOPs by MaxText's definition (the MFU numerator; useful work only).

MaxText's `calculate_tflops_training_per_device` (AI-Hypercomputer/maxtext,
maxtext_utils.py), for a GQA transformer with a SwiGLU FFN or a top-k MoE of SwiGLU experts.
Per token, per layer, forward (d = d_model, H / Hkv = query / KV heads, h = head_dim,
I = ffn_hidden, E experts of which k run, T = sequence length, V = vocabulary):

  weights    2 d (H + 2 Hkv) h          q, k, v projections
           + 2 d H h                    output projection
           + 2 * 3 d I * k              SwiGLU: gate, up, down of the k experts that run
                                        (k = 1 for a dense FFN)
           + 2 d E                      router (MoE only)
  attention  4 T H h / 2                scores and weighted values, halved for the causal mask

  model FLOPs per step = m * B * T * [ L * (weights + attention) + 2 d V ]

with m = 3 for training (forward + backward), m = 1 for evaluation (forward only), B
sequences of T tokens, and 2 d V the LM head (MaxText's "embedding" term: one [d, V] matmul;
the input embedding is a lookup, not counted). MaxText multiplies both the weight and the
attention terms by 3 in training; 3 x (2 per multiply-add) is the "6N" rule, N = the active
non-embedding matmul parameters plus the head.

Conventions worth knowing:
- Frozen parameters: the convention still counts 3x (6N). A step that skips their weight
  gradients (expert training: frozen attention, embeddings, head, public expert) executes
  less than this while its MFU numerator stays the same.
- Not counted: rematerialisation, capacity padding, one-hot dispatch einsums, elementwise
  work. The AOT planner reports what the compiled step executes next to this number.
- `causal=False` gives MaxText's attention term before its PR #1988 (2025), which did not
  halve it; published MFUs of that time (the Mixtral anchors in aot/calibration.py) use it.
"""
from __future__ import annotations

from flexolmo_jax.model.config import ModelConfig

MULTIPLIER = {"train": 3.0, "eval": 1.0}


def weight_flops_per_token(cfg: ModelConfig) -> float:
  """Forward matmul FLOPs per token against weights (all layers + LM head)."""
  d, h = cfg.d_model, cfg.head_dim
  qkv = 2 * d * (cfg.n_heads + 2 * cfg.n_kv_heads) * h
  out = 2 * d * cfg.n_heads * h
  ffn = 2 * 3 * d * cfg.ffn_hidden * (cfg.top_k if cfg.is_moe else 1)
  router = 2 * d * cfg.num_experts if cfg.is_moe else 0
  return float(cfg.n_layers * (qkv + out + ffn + router) + 2 * d * cfg.vocab_size)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward QK^T and PV FLOPs per token, all layers (halved for the causal mask)."""
  full = 4.0 * seq_len * cfg.n_heads * cfg.head_dim
  return cfg.n_layers * (full / 2 if causal else full)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  return weight_flops_per_token(cfg) + attention_flops_per_token(cfg, seq_len, causal)


def model_flops(cfg: ModelConfig, batch: int, seq_len: int, mode: str = "train",
                causal: bool = True) -> float:
  """Model FLOPs of one step over all chips (module doc); mode 'train' or 'eval'."""
  return MULTIPLIER[mode] * forward_flops_per_token(cfg, seq_len, causal) * batch * seq_len


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int, causal: bool = True) -> float:
  return model_flops(cfg, batch, seq_len, "eval", causal)


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, causal: bool = True) -> float:
  """The MFU convention for training: 3 x forward (6N + attention), whatever is frozen."""
  return model_flops(cfg, batch, seq_len, "train", causal)
