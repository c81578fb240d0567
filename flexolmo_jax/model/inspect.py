"""Parameter counts and the parameter table of a config, without allocating any weights.

  python -m flexolmo_jax.inspect --config=configs/flexolmo_8x7b.py [--json]
  python -m flexolmo_jax.inspect --config=configs/tiny.py:expert --config.model.num_experts=2

With --json the last line printed is a JSON object (total_params, active_params, ...).
"""
from __future__ import annotations

import json
import math

from absl import app, flags
import jax
from ml_collections import config_flags

from flexolmo_jax import cli, config_base
from flexolmo_jax.model import abstract_params, count_params, param_logical_axes

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).",
                                          lock_config=True, flag_values=FLAGS)
_JSON = flags.DEFINE_bool("json", False, "End with a one-line JSON summary.", flag_values=FLAGS)


def param_table(cfg) -> list[dict]:
  shapes = abstract_params(cfg)
  axes = param_logical_axes(cfg)
  rows = []
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    rows.append({
        "path": "/".join(getattr(k, "key", str(k)) for k in path),
        "shape": list(leaf.shape),
        "dtype": str(leaf.dtype),
        "logical_axes": [a if a is None or isinstance(a, str) else list(a) for a in tuple(spec)],
        "params": math.prod(leaf.shape),
    })
  return rows


def _main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  cfg = config_base.model_config(_CONFIG.value)
  rows = param_table(cfg)
  counts = count_params(cfg)
  width = max(len(r["path"]) for r in rows)
  print(f"{'parameter':<{width}}  {'shape':<28} {'logical axes':<44} {'count':>15}")
  for r in rows:
    print(f"{r['path']:<{width}}  {str(tuple(r['shape'])):<28} {str(tuple(r['logical_axes'])):<44} "
          f"{r['params']:>15,}")
  print()
  print(f"total parameters:  {counts['total_params']:>18,}")
  if cfg.is_moe:
    print(f"active per token:  {counts['active_params']:>18,}   (top-{cfg.top_k} of "
          f"{cfg.num_experts} experts: {', '.join(cfg.names)})")
  if counts["bias_params"]:
    print(f"expert bias:       {counts['bias_params']:>18,}   (training only; dropped at merge)")
  if _JSON.value:
    summary = dict(counts, num_experts=cfg.num_experts, top_k=cfg.top_k,
                   expert_names=list(cfg.names) if cfg.is_moe else [],
                   n_layers=cfg.n_layers, d_model=cfg.d_model, vocab_size=cfg.vocab_size)
    print(json.dumps(summary))


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
