"""Model benchmarks on the bench config (FLEXOLMO.md section 7), peers measured in one run.

  python benchmarks/bench_model.py [--batch=8] [--seq=512] [--repeats=5]

Reports (ratios matter; absolute times drift on shared machines):
  1. forward tokens/s of this model (bf16 operands, f32 accumulation, `capacity` dispatch)
     vs transformers FlexOlmoForCausalLM on torch CPU (fp32 and bf16 autocast);
  2. the MoE layer (top-2 of 4, capacity) vs a dense SwiGLU FFN with the same active FLOPs;
  3. achieved FLOP/s against a bf16 matmul (f32 accumulation) measured in the same run.
The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import hf_flexolmo, median_time, peak_rss_mb, report  # noqa: E402
from flexolmo_jax.model import FlexOlmo, ModelConfig, init_params  # noqa: E402
from flexolmo_jax.model.flops import forward_flops  # noqa: E402
from flexolmo_jax.model.layers import MLP  # noqa: E402
from flexolmo_jax.model.moe import MoE  # noqa: E402

BENCH = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, ffn_hidden=688,
             num_experts=4, top_k=2, dispatch="capacity", capacity_factor=1.25,
             eos_token_id=1, pad_token_id=0, max_seq_len=512)


def bench_matmul(n=2048):
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  t = median_time(lambda: f(a, a).block_until_ready())
  return 2 * n ** 3 / t


def bench_ours(cfg, batch, seq, repeats):
  params = init_params(cfg, jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  fwd = jax.jit(lambda p, x: FlexOlmo(cfg).apply({"params": p}, x)[0])
  return median_time(lambda: fwd(params, ids).block_until_ready(), repeats)


def bench_transformers(cfg, batch, seq, repeats, bf16: bool):
  import torch
  model = hf_flexolmo(cfg)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq))

  def run():
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      model(ids, use_cache=False)
  return median_time(run, repeats)


def bench_moe_vs_dense(cfg, batch, seq, repeats):
  """One MoE layer (top-k of E, capacity) vs a dense SwiGLU with k * I hidden units."""
  h = jnp.asarray(np.random.default_rng(0).normal(size=(batch, seq, cfg.d_model)), jnp.bfloat16)
  moe = MoE(cfg)
  dense_cfg = cfg.replace(num_experts=0, ffn_hidden=cfg.ffn_hidden * cfg.top_k)
  mlp = MLP(dense_cfg)
  pm = moe.init(jax.random.key(0), h)
  pd = mlp.init(jax.random.key(0), h)
  f_moe = jax.jit(lambda p, x: moe.apply(p, x)[0])
  f_dense = jax.jit(lambda p, x: mlp.apply(p, x))
  t_moe = median_time(lambda: f_moe(pm, h).block_until_ready(), repeats)
  t_dense = median_time(lambda: f_dense(pd, h).block_until_ready(), repeats)
  return t_moe, t_dense


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args()
  cfg = ModelConfig(**BENCH)
  tokens = args.batch * args.seq

  peak = bench_matmul()
  t_ours = bench_ours(cfg, args.batch, args.seq, args.repeats)
  flops = forward_flops(cfg, args.batch, args.seq)
  res = {
      "backend": jax.default_backend(),
      "bf16_matmul_gflops": peak / 1e9,
      "ours_forward_tokens_per_s": tokens / t_ours,
      "ours_forward_gflops": flops / t_ours / 1e9,
      "ours_fraction_of_matmul_peak": flops / t_ours / peak,
  }
  if not args.skip_torch:
    t_fp32 = bench_transformers(cfg, args.batch, args.seq, args.repeats, bf16=False)
    t_bf16 = bench_transformers(cfg, args.batch, args.seq, args.repeats, bf16=True)
    res.update(hf_fp32_forward_tokens_per_s=tokens / t_fp32,
               hf_bf16_forward_tokens_per_s=tokens / t_bf16,
               forward_speedup_vs_hf_best=min(t_fp32, t_bf16) / t_ours)
  t_moe, t_dense = bench_moe_vs_dense(cfg, args.batch, args.seq, args.repeats)
  res.update(moe_layer_ms=t_moe * 1e3, dense_ffn_same_active_flops_ms=t_dense * 1e3,
             moe_over_dense=t_moe / t_dense, peak_rss_mb=peak_rss_mb())
  report(res)


if __name__ == "__main__":
  main()
