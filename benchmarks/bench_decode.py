"""Decode throughput: flexolmo_jax.inference.generate vs transformers `generate`, same tiny model, one run.

  python benchmarks/bench_decode.py [--new_tokens=128] [--prompt_len=32] [--repeats=3]

The bench config (FLEXOLMO.md section 7: vocab 8192, d 256, 4 layers, 4 heads, FFN 688,
4 experts, top-2) with random weights, copied into transformers' FlexOlmoForCausalLM.
Greedy decoding of exactly `new_tokens` tokens (no early stop) at batch 1 and 8, KV cache on
both sides, in fp32 (ours: fp32 compute; transformers: fp32 model) and in bf16 (ours: bf16
weights, bf16 matmul operands with f32 accumulation; transformers: the model in bf16).
tokens/s counts generated tokens (batch x new_tokens) over the wall time of the whole call,
prefill included; contenders run in --repeats interleaved rounds (the machine may be shared)
and print median [min .. max]; a speedup is the median of per-round ratios with its spread
(JSON keys *_min / *_max). Also reports how far the two greedy outputs agree in fp32.
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

from common import interleaved, peak_rss_mb, put_ratio, show_times, spread  # noqa: E402
from flexolmo_jax.convert import hf_mapping  # noqa: E402
from flexolmo_jax.inference.generate import Sampling, left_pad, make_generate_fn  # noqa: E402
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


def hf_runner(model, prompts, new_tokens):
  import torch
  ids = torch.as_tensor(np.asarray(prompts, np.int64))
  attn = torch.ones_like(ids)

  def run():
    with torch.no_grad():
      out = model.generate(ids, attention_mask=attn, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].numpy()
  return run


def ours_runner(cfg, params, prompts, new_tokens):
  fn = make_generate_fn(cfg, Sampling(new_tokens, stop_at_eos=False))
  ids, valid = left_pad(prompts, cfg.pad_token_id)
  ids, valid = jnp.asarray(ids), jnp.asarray(valid)
  key = jax.random.key(0)
  return lambda: np.asarray(jax.block_until_ready(fn(params, ids, valid, None, key))[0])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count() or 2)
  cfg32 = ModelConfig(**BENCH, dtype="float32", dispatch="dense")
  params = init_params(cfg32, jax.random.key(0))
  # The bf16 contender holds bf16 weights, as the torch bf16 peer does (`model.to(bf16)`):
  # decode reads every weight per token, and f32 weights would be read and cast each step.
  params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  res = {"backend": jax.default_backend(), "new_tokens": args.new_tokens,
         "prompt_len": args.prompt_len, "torch_threads": torch.get_num_threads()}
  model = None if args.skip_torch else hf_model(cfg32, params)
  model_bf16 = None if args.skip_torch else hf_model(cfg32, params).to(torch.bfloat16)
  rng = np.random.default_rng(0)
  for B in [int(b) for b in args.batches.split(",")]:
    prompts = rng.integers(2, cfg32.vocab_size, (B, args.prompt_len)).tolist()
    tokens = B * args.new_tokens
    runners = {"ours_fp32": ours_runner(cfg32, params, prompts, args.new_tokens),
               "ours_bf16": ours_runner(cfg32.replace(dtype="bfloat16"), params_bf16, prompts,
                                        args.new_tokens)}
    if model is not None:
      runners["hf_fp32"] = hf_runner(model, prompts, args.new_tokens)
      runners["hf_bf16"] = hf_runner(model_bf16, prompts, args.new_tokens)
    outs = {name: run() for name, run in runners.items()}  # compile outside the rounds
    t = interleaved(runners, args.repeats, warmup=0)
    print(f"batch {B}:")
    show_times(t, per=tokens, per_unit="tokens/s")
    for name, ts in t.items():
      res[f"b{B}_{name}_tok_s"] = tokens / spread(ts)[1]
    if model is not None:
      put_ratio(res, f"b{B}_speedup_fp32_vs_hf_fp32", t["hf_fp32"], t["ours_fp32"])
      put_ratio(res, f"b{B}_speedup_bf16_vs_hf_bf16", t["hf_bf16"], t["ours_bf16"])
      # Best contender of each side in the same round.
      put_ratio(res, f"b{B}_speedup_best_vs_best",
                [min(a, b) for a, b in zip(t["hf_fp32"], t["hf_bf16"])],
                [min(a, b) for a, b in zip(t["ours_fp32"], t["ours_bf16"])])
      # Greedy outputs agree up to the first near-tie; report the agreeing prefix share.
      first_diff = [int(np.argmax(a != b)) if np.any(a != b) else len(a)
                    for a, b in zip(outs["ours_fp32"], outs["hf_fp32"])]
      res[f"b{B}_greedy_prefix_agreement"] = float(np.mean(first_diff) / args.new_tokens)
  res["peak_rss_mb"] = peak_rss_mb()
  for k, v in res.items():
    print(f"{k:>30}: {v:.4g}" if isinstance(v, float) else f"{k:>30}: {v}")
  print(json.dumps(res))


if __name__ == "__main__":
  main()
