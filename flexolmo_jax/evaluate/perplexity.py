"""Perplexity per domain on held-out splits of prepared datasets, with routing statistics.

Every validation token is scored exactly once (make_eval_loader); perplexity is
exp(summed token loss / token count). Each batch is read once and evaluated for every
expert subset. Multi-host: each process reads its share of every global batch.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np

from flexolmo_jax.data import DataError, make_eval_loader, resolve_dataset_dir
from flexolmo_jax.evaluate import steps
from flexolmo_jax.storage.paths import as_path


def discover_domains(spec: str) -> dict[str, str]:
  """--data: 'name=path,...', a dataset directory, or a directory of datasets (one domain per
  subdirectory, e.g. a FlexMix-mini root)."""
  spec = spec.strip()
  if "=" in spec:
    out = {}
    for item in spec.split(","):
      name, _, path = item.partition("=")
      if not name.strip() or not path.strip():
        raise DataError(f"bad --data entry {item!r}; expected name=path")
      out[name.strip()] = resolve_dataset_dir(path.strip())
    return out
  root = as_path(spec)  # any epath location: local, gs://...
  if not root.is_dir():
    raise DataError("no such data directory", location=str(root))
  try:
    return {root.name: resolve_dataset_dir(os.fspath(root))}
  except DataError:
    pass
  out = {}
  for sub in sorted(root.iterdir(), key=lambda p: p.name):
    name = sub.name
    if name.startswith(".") or not sub.is_dir():
      continue
    try:
      out[name] = resolve_dataset_dir(os.fspath(sub))
    except DataError:
      continue
  if not out:
    raise DataError("no prepared datasets found", location=str(root))
  return out


def default_tokenizer(spec: str) -> str | None:
  """DATA/tokenizer.json when --data is a directory that has one (FlexMix-mini layout)."""
  if "=" in spec:
    return None
  path = as_path(spec.strip()) / "tokenizer.json"
  return os.fspath(path) if path.is_file() else None


def evaluate_domains(step, params, cfg, domains: dict[str, str], tokenizer: str, seq_len: int,
                     batch_size: int, subsets, batch_shardings, split: str = "validation",
                     max_batches: int | None = None) -> dict[str, dict[str, dict]]:
  """{subset name: {domain: {loss, ppl, tokens, routing [L][E] share of tokens}}}."""
  masks = {s.name: s.mask(cfg, batch_size) for s in subsets}
  out: dict[str, dict[str, dict]] = {s.name: {} for s in subsets}
  for domain, path in domains.items():
    loader = make_eval_loader(path, tokenizer, seq_len, batch_size, split=split, num_threads=1)
    acc = {s.name: {"loss_sum": 0.0, "tokens": 0.0, "routed": 0.0} for s in subsets}
    for i, local in enumerate(loader):
      if max_batches is not None and i >= max_batches:
        break
      batch = steps.global_batch(local, batch_shardings)
      for s in subsets:
        r = jax.device_get(step(params, batch, masks[s.name]))
        a = acc[s.name]
        a["loss_sum"] += float(r["loss_sum"])
        a["tokens"] += float(r["tokens"])
        a["routed"] = a["routed"] + np.asarray(r["routed"], np.float64)
    for s in subsets:
      a = acc[s.name]
      n = a["tokens"]
      loss = a["loss_sum"] / n if n else float("nan")
      routing = (np.asarray(a["routed"]) / n).tolist() if n and cfg.is_moe else []
      out[s.name][domain] = {"loss": loss, "ppl": math.exp(loss) if n else float("nan"),
                             "tokens": int(n), "routing": routing}
  return out
