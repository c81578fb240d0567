"""Decode throughput: flexolmo_jax.generate vs transformers `generate`, same tiny model, one run.

  python benchmarks/bench_decode.py [--new_tokens=128] [--prompt_len=32] [--repeats=3]

The bench config (FLEXOLMO.md section 7: vocab 8192, d 256, 4 layers, 4 heads, FFN 688,
4 experts, top-2) with random weights, copied into transformers' FlexOlmoForCausalLM.
Greedy decoding of exactly `new_tokens` tokens (no early stop) at batch 1 and 8; both sides
use a KV cache and fp32 weights; ours also runs with bf16 matmul operands (the model
default). tokens/s counts generated tokens (batch x new_tokens) over the wall time of the
whole call, prefill included. Also reports how often the two greedy outputs agree in fp32.
The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import median_time, peak_rss_mb  # noqa: E402
from flexolmo_jax.convert import hf_mapping  # noqa: E402
from flexolmo_jax.generate import Sampling, left_pad, make_generate_fn  # noqa: E402
from flexolmo_jax.model import ModelConfig, init_params  # noqa: E402

BENCH = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, ffn_hidden=688,
             num_experts=4, top_k=2, eos_token_id=1, pad_token_id=0, max_seq_len=512)


def hf_model(cfg, params):
  import torch
  import transformers
  c = transformers.FlexOlmoConfig(**{k: v for k, v in hf_mapping.hf_config(cfg).items()
                                     if k not in ("architectures", "model_type")})
  model = transformers.FlexOlmoForCausalLM(c).eval()
  sd = hf_mapping.params_to_hf(jax.device_get(params), cfg, fused=True)
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
                        strict=True)
  return model


def bench_hf(model, prompts, new_tokens, repeats):
  import torch
  ids = torch.as_tensor(np.asarray(prompts, np.int64))
  attn = torch.ones_like(ids)

  def run():
    with torch.no_grad():
      return model.generate(ids, attention_mask=attn, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                            pad_token_id=0, eos_token_id=None)
  out = run()
  return median_time(run, repeats, warmup=0), out[:, ids.shape[1]:].numpy()


def bench_ours(cfg, params, prompts, new_tokens, repeats):
  fn = make_generate_fn(cfg, Sampling(new_tokens, stop_at_eos=False))
  ids, valid = left_pad(prompts, cfg.pad_token_id)
  ids, valid = jnp.asarray(ids), jnp.asarray(valid)
  key = jax.random.key(0)
  run = lambda: jax.block_until_ready(fn(params, ids, valid, None, key))
  out = run()  # compile
  return median_time(run, repeats, warmup=0), np.asarray(out[0])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count() or 2)
  cfg32 = ModelConfig(**BENCH, dtype="float32", dispatch="dense")
  params = init_params(cfg32, jax.random.key(0))
  res = {"backend": jax.default_backend(), "new_tokens": args.new_tokens,
         "prompt_len": args.prompt_len, "torch_threads": torch.get_num_threads()}
  model = None if args.skip_torch else hf_model(cfg32, params)
  rng = np.random.default_rng(0)
  for B in [int(b) for b in args.batches.split(",")]:
    prompts = rng.integers(2, cfg32.vocab_size, (B, args.prompt_len)).tolist()
    tokens = B * args.new_tokens
    t32, out32 = bench_ours(cfg32, params, prompts, args.new_tokens, args.repeats)
    t16, _ = bench_ours(cfg32.replace(dtype="bfloat16"), params, prompts, args.new_tokens,
                        args.repeats)
    res[f"b{B}_ours_fp32_tok_s"] = tokens / t32
    res[f"b{B}_ours_bf16_tok_s"] = tokens / t16
    if model is not None:
      thf, outhf = bench_hf(model, prompts, args.new_tokens, args.repeats)
      res[f"b{B}_hf_fp32_tok_s"] = tokens / thf
      res[f"b{B}_speedup_fp32"] = thf / t32
      res[f"b{B}_speedup_bf16"] = thf / t16
      # Greedy outputs agree up to the first near-tie; report the agreeing prefix share.
      first_diff = [int(np.argmax(a != b)) if np.any(a != b) else len(a)
                    for a, b in zip(out32, outhf)]
      res[f"b{B}_greedy_prefix_agreement"] = float(np.mean(first_diff) / args.new_tokens)
  res["peak_rss_mb"] = peak_rss_mb()
  for k, v in res.items():
    print(f"{k:>30}: {v:.4g}" if isinstance(v, float) else f"{k:>30}: {v}")
  print(json.dumps(res))


if __name__ == "__main__":
  main()
