"""AdamW with linear warm-up and cosine decay to end_lr_ratio * lr, global-norm clipping."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(tc) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.lr, warmup_steps=max(int(tc.warmup_steps), 0),
      decay_steps=max(int(tc.steps), int(tc.warmup_steps) + 1), end_value=tc.lr * tc.end_lr_ratio)


def _decay_mask(params):
  # No weight decay on norm scales and expert biases (1-D gains/offsets).
  return jax.tree_util.tree_map_with_path(
      lambda p, x: not (p[-1].key.endswith("scale") or p[-1].key.endswith("router_bias")), params)


def make_optimizer(tc) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """tc: the config's `train` block. Clipping sees only the trainable leaves it is given."""
  schedule = learning_rate_schedule(tc)
  tx = optax.chain(
      optax.clip_by_global_norm(tc.clip) if tc.clip and tc.clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                  mask=_decay_mask),
  )
  return tx, schedule
