"""Model benchmarks on the bench config (FLEXOLMO.md section 7), peers measured in one run.

  python benchmarks/bench_model.py [--batch=8] [--seq=512] [--repeats=5] [--skip-torch]

Reports (ratios matter; absolute times drift on shared machines):
  1. forward tokens/s of this model (bf16 operands, f32 accumulation, `capacity` dispatch)
     vs transformers FlexOlmoForCausalLM on torch CPU (fp32 and bf16 autocast);
  2. the MoE layer (top-2 of 4, capacity) vs a dense SwiGLU FFN with the same active FLOPs;
  3. achieved FLOP/s against a bf16 matmul (f32 accumulation) measured in the same run.
Contenders run interleaved (common.interleaved): each prints median [min .. max] over the
rounds; a ratio is the median of per-round ratios with its spread (JSON keys *_min / *_max).
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

from common import (add_model_flags, apply_model_flags, hf_flexolmo, interleaved,  # noqa: E402
                    median_time, peak_rss_mb, put_ratio, report, show_times, spread)
from flexolmo_jax.model import FlexOlmo, ModelConfig, init_params  # noqa: E402
from flexolmo_jax.model.flops import forward_flops  # noqa: E402
from flexolmo_jax.model.layers import MLP  # noqa: E402
from flexolmo_jax.model.moe import MoE  # noqa: E402

# Attention "chunked" with 128-blocks: on XLA:CPU the blockwise kernel skips the masked
# upper triangle and keeps score blocks in cache; ~2x faster than the "xla" reference for
# fwd + bwd at T=512 (bench_components.py), the CPU choice (FLEXOLMO.md section 7).
BENCH = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, ffn_hidden=688,
             num_experts=4, top_k=2, dispatch="capacity", capacity_factor=1.25,
             attention="chunked", attention_chunk=128,
             eos_token_id=1, pad_token_id=0, max_seq_len=512)
MATMUL_N = 2048
MATMUL_FLOPS = 2 * MATMUL_N ** 3


def matmul_runner(n=MATMUL_N):
  """A blocking bf16 x bf16 -> f32 [n, n] matmul: the machine's matmul peak, as a contender."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  return lambda: f(a, a).block_until_ready()


def bench_matmul(n=MATMUL_N):
  return 2 * n ** 3 / median_time(matmul_runner(n))


def ours_runner(cfg, batch, seq):
  params = init_params(cfg, jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  fwd = jax.jit(lambda p, x: FlexOlmo(cfg).apply({"params": p}, x)[0])
  fwd(params, ids).block_until_ready()
  return lambda: fwd(params, ids).block_until_ready()


def transformers_runner(cfg, batch, seq, bf16: bool):
  import torch
  model = hf_flexolmo(cfg)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq))

  def run():
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      model(ids, use_cache=False)
  return run


def moe_vs_dense_runners(cfg, batch, seq):
  """One MoE layer (top-k of E, capacity) vs a dense SwiGLU with k * I hidden units."""
  h = jnp.asarray(np.random.default_rng(0).normal(size=(batch, seq, cfg.d_model)), jnp.bfloat16)
  moe = MoE(cfg)
  dense_cfg = cfg.replace(num_experts=0, ffn_hidden=cfg.ffn_hidden * cfg.top_k)
  mlp = MLP(dense_cfg)
  pm = moe.init(jax.random.key(0), h)
  pd = mlp.init(jax.random.key(0), h)
  f_moe = jax.jit(lambda p, x: moe.apply(p, x)[0])
  f_dense = jax.jit(lambda p, x: mlp.apply(p, x))
  return {"moe": lambda: f_moe(pm, h).block_until_ready(),
          "dense": lambda: f_dense(pd, h).block_until_ready()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-torch", action="store_true")
  add_model_flags(ap)
  args = ap.parse_args()
  cfg = apply_model_flags(ModelConfig(**BENCH), args)
  tokens = args.batch * args.seq

  flops = forward_flops(cfg, args.batch, args.seq)
  fns = {"matmul": matmul_runner(), "ours": ours_runner(cfg, args.batch, args.seq)}
  if not args.skip_torch:
    fns["hf_fp32"] = transformers_runner(cfg, args.batch, args.seq, bf16=False)
    fns["hf_bf16"] = transformers_runner(cfg, args.batch, args.seq, bf16=True)
  print("forward:")
  t = interleaved(fns, args.repeats, warmup=1)
  show_times(t, per=tokens, per_unit="tokens/s")
  t_ours = spread(t["ours"])[1]
  res = {
      "backend": jax.default_backend(), "attention": cfg.attention,
      "attention_chunk": cfg.attention_chunk, "dispatch": cfg.dispatch,
      "bf16_matmul_gflops": MATMUL_FLOPS / spread(t["matmul"])[1] / 1e9,
      "ours_forward_tokens_per_s": tokens / t_ours,
      "ours_forward_gflops": flops / t_ours / 1e9,
  }
  # Fraction of the matmul peak of the same round (both see the same load).
  frac = spread([flops / a / (MATMUL_FLOPS / m) for a, m in zip(t["ours"], t["matmul"])])
  res["ours_fraction_of_matmul_peak"], res["ours_fraction_of_matmul_peak_min"], \
      res["ours_fraction_of_matmul_peak_max"] = frac[1], frac[0], frac[2]
  if not args.skip_torch:
    res.update(hf_fp32_forward_tokens_per_s=tokens / spread(t["hf_fp32"])[1],
               hf_bf16_forward_tokens_per_s=tokens / spread(t["hf_bf16"])[1])
    best = [min(a, b) for a, b in zip(t["hf_fp32"], t["hf_bf16"])]
    put_ratio(res, "forward_speedup_vs_hf_best", best, t["ours"])
  print("MoE layer vs dense FFN of the same active FLOPs:")
  t2 = interleaved(moe_vs_dense_runners(cfg, args.batch, args.seq), args.repeats, warmup=1)
  show_times(t2)
  res.update(moe_layer_ms=spread(t2["moe"])[1] * 1e3,
             dense_ffn_same_active_flops_ms=spread(t2["dense"])[1] * 1e3)
  put_ratio(res, "moe_over_dense", t2["moe"], t2["dense"])
  res["peak_rss_mb"] = peak_rss_mb()
  report(res)


if __name__ == "__main__":
  main()
