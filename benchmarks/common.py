"""Timing helpers shared by the benchmark scripts (median of repeats, peak RSS)."""
from __future__ import annotations

import resource
import statistics
import time


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn() in seconds; fn must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(results: dict) -> None:
  """Aligned console lines, then the one-line JSON summary the README quotes."""
  import json
  width = max(len(k) for k in results)
  for k, v in results.items():
    print(f"{k:>{width}}: {v:.4g}" if isinstance(v, float) else f"{k:>{width}}: {v}")
  print(json.dumps(results))


def hf_flexolmo(cfg, train: bool = False):
  """The transformers FlexOlmo peer with this project's config (torch imported lazily)."""
  import os
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count() or 2)
  c = transformers.FlexOlmoConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, num_experts=cfg.num_experts,
      num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob,
      pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id, bos_token_id=None,
      rope_parameters={"rope_theta": float(cfg.rope_theta), "rope_type": "default"})
  model = transformers.FlexOlmoForCausalLM(c)
  return model.train() if train else model.eval()
