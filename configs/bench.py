"""The benchmark model of FLEXOLMO.md section 7: vocab 8192, d 256, 4 layers, 4 heads,
FFN 688, 4 experts, top-2 (batch 8 x 512 in the benchmarks). Argument: dispatch mode.

  python benchmarks/bench_model.py
  python -m flexolmo_jax.inspect --config=configs/bench.py:capacity
"""
from flexolmo_jax import config_base as cb


def get_config(arg=None):
  dispatch = arg or "capacity"
  model = cb.model_block(
      vocab_size=8192, d_model=256, n_layers=4, n_heads=4, ffn_hidden=688, max_seq_len=512,
      eos_token_id=1, pad_token_id=0,
      **cb.moe_fields(("public", "a", "b", "c"), top_k=2, dispatch=dispatch, capacity_factor=1.25))
  return cb.base_config(model)
