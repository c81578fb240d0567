"""Tiny models for tests and the CPU demo. Argument: dense | expert | moe4 (default moe4).

  dense   the public model (plain SwiGLU block)
  expert  2-expert training model (top-2 of 2, learned bias on expert 1)
  moe4    4-expert merged model (public + 3 domains), top-2

  python -m flexolmo_jax.inspect --config=configs/tiny.py:expert
"""
from flexolmo_jax import config_base as cb

TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
            max_seq_len=256, eos_token_id=1, pad_token_id=0, dtype="float32")


def get_config(arg=None):
  kind = arg or "moe4"
  if kind == "dense":
    extra = {}
  elif kind == "expert":
    extra = cb.moe_fields(("public", "expert1"), top_k=2, expert_bias=True, dispatch="dense")
  elif kind == "moe4":
    extra = cb.moe_fields(("public", "code", "math", "legal"), top_k=2, dispatch="capacity",
                          capacity_factor=2.0)
  else:
    raise ValueError(f"unknown tiny config {kind!r}; use dense, expert or moe4")
  return cb.base_config(cb.model_block(**TINY, **extra))
