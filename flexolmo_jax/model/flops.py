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
  `executed_train_flops` is the frozen-aware count: forward (1x) + activation gradients
  (1x of every weight matmul, 2x of attention) + weight gradients (1x) of the trainable
  leaves only; with everything trainable it equals `train_flops`.
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


def weight_flops_by_leaf(cfg: ModelConfig) -> dict[str, float]:
  """Forward matmul FLOPs per token of each weight leaf (by its last path component, all
  layers together); the values sum to `weight_flops_per_token`. An expert leaf counts the
  k experts that run on each token."""
  d, h, L = cfg.d_model, cfg.head_dim, cfg.n_layers
  k = cfg.top_k if cfg.is_moe else 1
  out = {"q_proj": 2 * d * cfg.n_heads * h, "k_proj": 2 * d * cfg.n_kv_heads * h,
         "v_proj": 2 * d * cfg.n_kv_heads * h, "o_proj": 2 * d * cfg.n_heads * h,
         "gate_proj": 2 * d * cfg.ffn_hidden * k, "up_proj": 2 * d * cfg.ffn_hidden * k,
         "down_proj": 2 * d * cfg.ffn_hidden * k}
  if cfg.is_moe:
    out["router"] = 2 * d * cfg.num_experts
  out = {name: float(L * f) for name, f in out.items()}
  out["lm_head"] = float(2 * d * cfg.vocab_size)
  return out


def executed_train_flops(cfg: ModelConfig, batch: int, seq_len: int,
                         trained: dict[str, float] | None = None, causal: bool = True) -> float:
  """Training FLOPs of one step that skips the weight gradients of frozen parameters.

  trained: {leaf name (as in `weight_flops_by_leaf`): the fraction of its forward FLOPs
  whose weight gradient is computed}: 1 for a trainable leaf, 0 (or absent) for a frozen
  one, s / E for an expert leaf of which s of E slots train (balanced routing: each slot
  sees k / E of the tokens). None: everything trains (= `train_flops`).

  Activation gradients are counted through every layer (1x each weight matmul, 2x the
  attention matmuls, whose operands are both activations): a scanned backward pass runs
  the same body for every layer, so it computes them even below the lowest trainable leaf.
  """
  by_leaf = weight_flops_by_leaf(cfg)
  unknown = sorted(set(trained or {}) - set(by_leaf))
  if unknown:
    raise ValueError(f"trained names leaves {unknown} that have no matmul FLOPs; known: "
                     f"{sorted(by_leaf)}")
  fwd = sum(by_leaf.values())
  grads = fwd if trained is None else sum(by_leaf[k] * float(f) for k, f in trained.items())
  per_token = 2 * fwd + grads + 3 * attention_flops_per_token(cfg, seq_len, causal)
  return per_token * batch * seq_len
