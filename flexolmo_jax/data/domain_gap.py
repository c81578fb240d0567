"""A cheap, model-free check that domains differ: bigram cross-entropy across domains.

For each domain a Witten-Bell smoothed bigram model is fitted on its train tokens and scored on
every domain's validation tokens. If a domain's own model beats the public model on that
domain's validation text by a clear margin, a domain expert has something to learn that the
public model does not already know. Seconds on CPU, no training involved.
"""
from __future__ import annotations

import numpy as np

from flexolmo_jax.data.packing import PackedRows, PackedSplit


def token_stream(packed: PackedSplit) -> np.ndarray:
  """The split's token stream (EOS d1 EOS d2 ... EOS) reassembled from its packed rows."""
  rows = PackedRows(packed)
  parts = []
  for i in range(len(rows)):
    ex = rows[i]
    n = int(ex["loss_mask"].sum())
    if i == 0:
      parts.append(ex["input_ids"][:1])
    parts.append(ex["targets"][:n])
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


class BigramModel:
  def __init__(self, tokens: np.ndarray, vocab_size: int):
    t = np.asarray(tokens, np.int64)
    self.v = vocab_size
    pairs = t[:-1] * vocab_size + t[1:]
    self.keys, self.counts = np.unique(pairs, return_counts=True)
    self.ctx = np.bincount(t[:-1], minlength=vocab_size).astype(np.float64)
    self.types = np.bincount(self.keys // vocab_size, minlength=vocab_size).astype(np.float64)
    uni = np.bincount(t, minlength=vocab_size).astype(np.float64)
    self.unigram = (uni + 1.0) / (uni.sum() + vocab_size)  # add-one: never zero

  def cross_entropy(self, tokens: np.ndarray) -> float:
    """Mean negative log-likelihood (nats/token) of tokens[1:] given their predecessor."""
    t = np.asarray(tokens, np.int64)
    a, b = t[:-1], t[1:]
    keys = a * self.v + b
    idx = np.clip(np.searchsorted(self.keys, keys), 0, max(len(self.keys) - 1, 0))
    c_ab = np.where(self.keys[idx] == keys, self.counts[idx], 0).astype(np.float64)
    c_a, t_a = self.ctx[a], self.types[a]
    denom = np.maximum(c_a + t_a, 1.0)
    # Witten-Bell: trust the bigram in proportion to how often the context was seen.
    p = np.where(c_a > 0, (c_ab + t_a * self.unigram[b]) / denom, self.unigram[b])
    return float(-np.mean(np.log(p)))


def cross_entropy_matrix(train: dict[str, np.ndarray], evaluation: dict[str, np.ndarray],
                         vocab_size: int) -> dict[str, dict[str, float]]:
  """matrix[model_domain][eval_domain] in nats/token."""
  out = {}
  for name, tokens in train.items():
    model = BigramModel(tokens, vocab_size)
    out[name] = {e: round(model.cross_entropy(t), 4) for e, t in evaluation.items()}
  return out
