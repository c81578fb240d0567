"""Training-step benchmarks on the bench config (FLEXOLMO.md section 7), peers in one run.

  python benchmarks/bench_train.py [--batch=8] [--seq=512] [--repeats=5]

  1. full training step (all params, AdamW, bf16 operands) of the 4-expert top-2 bench model:
     tokens/s vs transformers FlexOlmo training on torch CPU (best of fp32 / bf16 autocast);
  2. MFU against a bf16 matmul measured in the same run;
  3. expert-stage step (only expert 1, its router row and bias train) vs a full-training step
     of the same 2-expert model: frozen weights should cost no gradient work.
The last line is a JSON summary.
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

from common import hf_flexolmo, median_time, peak_rss_mb, report  # noqa: E402
from flexolmo_jax.config_base import STAGE_TRAINABLE, add_training  # noqa: E402
from flexolmo_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes  # noqa: E402
from flexolmo_jax.model.flops import train_flops  # noqa: E402
from flexolmo_jax.parallel import DEFAULT_RULES  # noqa: E402
from flexolmo_jax.train.optim import make_optimizer  # noqa: E402
from flexolmo_jax.train.partition import make_partition  # noqa: E402
from flexolmo_jax.train.step import init_state, make_step_fn  # noqa: E402
import bench_model  # noqa: E402


def step_time(cfg: ModelConfig, stage: str, batch: int, seq: int, repeats: int) -> float:
  patterns, experts = STAGE_TRAINABLE[stage]
  tc = add_training(ml_collections.ConfigDict(), stage, steps=1000, warmup_steps=10).train
  shapes = abstract_params(cfg)
  partition = make_partition(shapes, param_logical_axes(cfg), patterns, experts)
  trainable, frozen = partition.split(init_params(cfg, jax.random.key(0)))
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
  return median_time(run, repeats, warmup=2)


def hf_train_time(cfg: ModelConfig, batch: int, seq: int, repeats: int, bf16: bool) -> float:
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
  return median_time(run, repeats, warmup=1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args()
  B, T = args.batch, args.seq
  cfg = ModelConfig(**bench_model.BENCH)
  peak = bench_model.bench_matmul()
  t_full = step_time(cfg, "public", B, T, args.repeats)
  res = {"backend": jax.default_backend(), "bf16_matmul_gflops": peak / 1e9,
         "ours_train_tokens_per_s": B * T / t_full,
         "ours_train_mfu_vs_matmul": train_flops(cfg, B, T) / t_full / peak}
  if not args.skip_torch:
    t32 = hf_train_time(cfg, B, T, args.repeats, bf16=False)
    t16 = hf_train_time(cfg, B, T, args.repeats, bf16=True)
    res.update(hf_fp32_train_tokens_per_s=B * T / t32, hf_bf16_train_tokens_per_s=B * T / t16,
               train_speedup_vs_hf_best=min(t32, t16) / t_full)
  two = cfg.replace(num_experts=2, top_k=2, expert_bias=True, dispatch="dense")
  t_two_full = step_time(two, "public", B, T, args.repeats)
  t_two_expert = step_time(two, "expert", B, T, args.repeats)
  res.update(two_expert_full_step_ms=t_two_full * 1e3, two_expert_expert_stage_step_ms=t_two_expert * 1e3,
             expert_stage_over_full=t_two_expert / t_two_full, peak_rss_mb=peak_rss_mb())
  report(res)


if __name__ == "__main__":
  main()
