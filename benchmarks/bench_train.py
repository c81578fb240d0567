"""Training-step benchmarks on the bench config (FLEXOLMO.md section 7), peers in one run.

  python benchmarks/bench_train.py [--batch=8] [--seq=512] [--repeats=5] [--skip-torch]

  1. full training step (all params, AdamW, bf16 operands) of the 4-expert top-2 bench model:
     tokens/s vs transformers FlexOlmo training on torch CPU (best of fp32 / bf16 autocast);
  2. MFU against a bf16 matmul measured in the same run;
  3. expert-stage step (only expert 1, its router row and bias train) vs a full-training step
     of the same 2-expert model: frozen weights should cost no gradient work.
Contenders run interleaved (ours, peer, ours, peer, ...; common.interleaved): each prints
median [min .. max] over the rounds, each ratio is the median of per-round ratios with its
spread (keys *_min / *_max in the JSON). The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from common import (add_model_flags, apply_model_flags, hf_flexolmo, interleaved,  # noqa: E402
                    peak_rss_mb, put_ratio, report, show_times, spread)
from flexolmo_jax.config_base import STAGE_TRAINABLE, add_training  # noqa: E402
from flexolmo_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes  # noqa: E402
from flexolmo_jax.model.flops import train_flops  # noqa: E402
from flexolmo_jax.parallel import DEFAULT_RULES  # noqa: E402
from flexolmo_jax.train.optim import make_optimizer  # noqa: E402
from flexolmo_jax.train.partition import make_partition  # noqa: E402
from flexolmo_jax.train.step import init_state, make_step_fn  # noqa: E402
import bench_model  # noqa: E402


def step_runner(cfg: ModelConfig, stage: str, batch: int, seq: int):
  """A blocking call of one jitted training step (state donated and carried over)."""
  patterns, experts = STAGE_TRAINABLE[stage]
  tc = add_training(ml_collections.ConfigDict(), stage, steps=1000, warmup_steps=10).train
  shapes = abstract_params(cfg)
  partition = make_partition(shapes, param_logical_axes(cfg), patterns, experts)
  # Frozen leaves held as the trainer holds them (matmul-only ones in the compute dtype).
  trainable, frozen = partition.split(init_params(cfg, jax.random.key(0)), compute_dtype=cfg.dtype)
  tx, schedule = make_optimizer(tc)
  state = init_state(trainable, tx)
  step = jax.jit(make_step_fn(cfg, partition, tx, schedule, tc, DEFAULT_RULES), donate_argnums=(0,))
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
  b = {"input_ids": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
       "loss_mask": jnp.ones((batch, seq), jnp.float32)}
  box = [state]

  def run():
    box[0], m = step(box[0], frozen, b)
    jax.block_until_ready(m["loss"])
  run()  # compile outside the timed rounds
  return run


def hf_train_runner(cfg: ModelConfig, batch: int, seq: int, bf16: bool):
  import torch
  model = hf_flexolmo(cfg, train=True)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq))

  def run():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-torch", action="store_true")
  add_model_flags(ap)
  args = ap.parse_args()
  B, T = args.batch, args.seq
  cfg = apply_model_flags(ModelConfig(**bench_model.BENCH), args)
  flops = train_flops(cfg, B, T)
  fns = {"matmul": bench_model.matmul_runner(), "ours": step_runner(cfg, "public", B, T)}
  if not args.skip_torch:
    fns["hf_fp32"] = hf_train_runner(cfg, B, T, bf16=False)
    fns["hf_bf16"] = hf_train_runner(cfg, B, T, bf16=True)
  print("full training step:")
  t = interleaved(fns, args.repeats, warmup=1)
  show_times(t, per=B * T, per_unit="tokens/s")
  res = {"backend": jax.default_backend(), "attention": cfg.attention,
         "attention_chunk": cfg.attention_chunk, "dispatch": cfg.dispatch,
         "bf16_matmul_gflops": bench_model.MATMUL_FLOPS / spread(t["matmul"])[1] / 1e9,
         "ours_train_tokens_per_s": B * T / spread(t["ours"])[1]}
  # MFU against the matmul of the same round (both see the same load).
  mfu = [flops / a / (bench_model.MATMUL_FLOPS / m) for a, m in zip(t["ours"], t["matmul"])]
  res["ours_train_mfu_vs_matmul"], res["ours_train_mfu_vs_matmul_min"], \
      res["ours_train_mfu_vs_matmul_max"] = spread(mfu)[1], spread(mfu)[0], spread(mfu)[2]
  if not args.skip_torch:
    res.update(hf_fp32_train_tokens_per_s=B * T / spread(t["hf_fp32"])[1],
               hf_bf16_train_tokens_per_s=B * T / spread(t["hf_bf16"])[1])
    best = [min(a, b) for a, b in zip(t["hf_fp32"], t["hf_bf16"])]
    put_ratio(res, "train_speedup_vs_hf_best", best, t["ours"])
  two = cfg.replace(num_experts=2, top_k=2, expert_bias=True, dispatch="dense")
  print("2-expert model, full vs expert stage:")
  t2 = interleaved({"full": step_runner(two, "public", B, T),
                    "expert": step_runner(two, "expert", B, T)}, args.repeats, warmup=1)
  show_times(t2)
  res.update(two_expert_full_step_ms=spread(t2["full"])[1] * 1e3,
             two_expert_expert_stage_step_ms=spread(t2["expert"])[1] * 1e3)
  put_ratio(res, "expert_stage_over_full", t2["expert"], t2["full"])
  res["peak_rss_mb"] = peak_rss_mb()
  report(res)


if __name__ == "__main__":
  main()
