"""Timing helpers shared by the benchmark scripts: interleaved repeats, spreads, peak RSS.

The machine is usually shared, so a busy spell must hit every contender alike: contenders
run in rounds (ours, peer, ours, peer, ...), each reported as min / median / max of its
rounds, and a ratio is the median of the per-round ratios (each round's two timings are
seconds apart), with that ratio's own min / max as its spread.
"""
from __future__ import annotations

import resource
import statistics
import time


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn() in seconds; fn must block until its result is ready."""
  return statistics.median(interleaved({"fn": fn}, repeats, warmup)["fn"])


def interleaved(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
  """{name: [seconds per round]}: every fn once per round, in order, after `warmup` untimed
  rounds. Each fn must block until its result is ready."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def spread(xs) -> tuple[float, float, float]:
  return min(xs), statistics.median(xs), max(xs)


def ratio_spread(num, den) -> tuple[float, float, float]:
  """Per-round ratios num[i] / den[i] (same round, so the same load): (min, median, max)."""
  return spread([a / b for a, b in zip(num, den)])


def fmt(s, scale: float = 1.0, unit: str = "") -> str:
  lo, med, hi = (x * scale for x in s)
  return f"{med:.4g}{unit} [{lo:.4g} .. {hi:.4g}]"


def show_times(times: dict, label: str = "", per: float | None = None, per_unit: str = "") -> None:
  """One line per contender: median ms [min .. max] (and per/second, e.g. tokens/s)."""
  width = max(len(k) for k in times)
  for name, ts in times.items():
    line = f"  {label}{name:<{width}}  {fmt(spread(ts), 1e3, ' ms')}"
    if per and name != "matmul":  # the matmul contender is a FLOP/s reference, not tokens
      line += f"   {fmt(spread([per / t for t in ts]))} {per_unit}"
    print(line)


def put_ratio(res: dict, key: str, num, den) -> tuple[float, float, float]:
  """res[key] = median per-round ratio, res[key + '_min' / '_max'] = its spread; printed."""
  lo, med, hi = ratio_spread(num, den)
  res[key], res[key + "_min"], res[key + "_max"] = med, lo, hi
  print(f"  ratio {key} = {med:.3g} [{lo:.3g} .. {hi:.3g}]")
  return lo, med, hi


def add_model_flags(ap) -> None:
  """Kernel choices on top of the bench config, e.g. the pre-fix `--attention=xla`."""
  ap.add_argument("--attention", default=None, help="override cfg.attention")
  ap.add_argument("--attention_chunk", type=int, default=None)
  ap.add_argument("--dispatch", default=None)
  ap.add_argument("--capacity_impl", default=None)
  ap.add_argument("--logits_chunk", type=int, default=None)
  ap.add_argument("--scan_unroll", type=int, default=None,
                  help="layers per scan iteration (n_layers: fully unrolled)")


def apply_model_flags(cfg, args):
  names = ("attention", "attention_chunk", "dispatch", "capacity_impl", "logits_chunk",
           "scan_unroll")
  return cfg.replace(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})


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
