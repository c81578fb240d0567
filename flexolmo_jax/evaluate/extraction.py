"""Verbatim extraction: how much of a domain's training text the model reproduces.

The reference protocol (allenai/FlexOlmo, scripts/extraction_analysis.sh; FLEXOLMO.md section
9): give the model the first 32 tokens of a training document, decode 256 tokens greedily, and
count the document as extracted when the normalised Levenshtein similarity between the
generated tokens and the document's true continuation is >= 0.9. Here every length is an
option, so the protocol scales down to FlexMix-mini.

This is the practical side of opt-out: with expert i opted out, the extraction rate of domain
i's training documents should fall to the public model's.

Similarity is computed on token ids with rapidfuzz (1 - edit distance / max(len)). The true
continuation is the document's next `gen_len` tokens followed by EOS when the document ends
sooner; generation stops at EOS (kept), so a model that reproduces a short document and stops
scores 1.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

from flexolmo_jax.data import DataError, load_tokenizer, open_builder


@dataclasses.dataclass(frozen=True)
class ExtractionOptions:
  split: str = "train"  # the documents the model was trained on
  num_docs: int = 32  # per domain (fewer when the split has fewer long-enough documents)
  prefix_len: int = 32
  gen_len: int = 256
  threshold: float = 0.9
  seed: int = 0
  batch_size: int = 8

  def __post_init__(self):
    if self.num_docs < 1 or self.prefix_len < 1 or self.gen_len < 1 or self.batch_size < 1:
      raise ValueError(f"extraction needs num_docs, prefix_len, gen_len, batch_size >= 1: {self}")
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"extraction threshold must be in (0, 1], got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class Document:
  prefix: list[int]  # the prompt
  continuation: list[int]  # what a model that memorised the document generates next
  source: str  # where prepare_data found it (file:line)


def similarity(generated: Sequence[int], reference: Sequence[int]) -> float:
  """Normalised Levenshtein similarity of two token sequences, in [0, 1]."""
  return float(Levenshtein.normalized_similarity(list(generated), list(reference)))


def document_windows(token_ids: Sequence[int], prefix_len: int, gen_len: int,
                     eos_id: int) -> tuple[list[int], list[int]] | None:
  """(prefix, continuation) of one tokenised document; None when it has no continuation."""
  ids = list(token_ids)
  if len(ids) <= prefix_len:
    return None
  rest = ids[prefix_len:prefix_len + gen_len]
  if len(rest) < gen_len:  # the document ends inside the window: the model should stop
    rest.append(eos_id)
  return ids[:prefix_len], rest


def sample_documents(dataset: str, tokenizer_path: str, eos_id: int,
                     opts: ExtractionOptions) -> list[Document]:
  """Up to `num_docs` documents of the split with more than `prefix_len` tokens, drawn in a
  seeded random order (deterministic)."""
  builder = open_builder(dataset)
  if opts.split not in builder.info.splits:
    raise DataError(f"no split {opts.split!r} for extraction (has: "
                    f"{', '.join(builder.info.splits)})", location=str(builder.data_dir))
  source = builder.as_data_source(split=opts.split)
  tokenizer = load_tokenizer(tokenizer_path)
  order = np.random.default_rng(opts.seed).permutation(len(source))
  docs: list[Document] = []
  chunk = max(4 * opts.num_docs, 64)  # most documents qualify: read a few more than needed
  for start in range(0, len(order), chunk):
    items = source.__getitems__([int(i) for i in order[start:start + chunk]])
    texts = [it["text"].decode("utf-8") for it in items]
    for item, enc in zip(items, tokenizer.encode_batch(texts, add_special_tokens=False)):
      window = document_windows(enc.ids, opts.prefix_len, opts.gen_len, eos_id)
      if window is not None:
        docs.append(Document(*window, source=item["source"].decode("utf-8")))
        if len(docs) == opts.num_docs:
          return docs
  if not docs:
    raise DataError(f"no document of split {opts.split!r} is longer than the "
                    f"{opts.prefix_len}-token prefix", location=dataset)
  return docs


def score(generated: Sequence[Sequence[int]], docs: Sequence[Document],
          threshold: float) -> dict:
  """{extracted: share of documents with similarity >= threshold, similarity: mean,
  documents: n, similarities: per document}."""
  sims = [similarity(g, d.continuation) for g, d in zip(generated, docs, strict=True)]
  return {"extracted": float(np.mean([s >= threshold for s in sims])),
          "similarity": float(np.mean(sims)), "documents": len(sims),
          "similarities": [round(s, 4) for s in sims]}


def extraction_rates(params, cfg, docs_by_domain: dict[str, list[Document]], subsets,
                     opts: ExtractionOptions, vocab_limit: int | None = None,
                     log=print) -> dict[str, dict[str, dict]]:
  """{subset name: {domain: score(...)}}: greedy decoding of every document's prefix, with
  each subset's experts opted out. One compiled generate serves every batch and subset (the
  last batch is padded with copies of its first document, whose outputs are dropped)."""
  from flexolmo_jax.inference.generate import Sampling, generate, make_generate_fn
  sampling = Sampling(max_new_tokens=opts.gen_len, temperature=0.0, stop_at_eos=True,
                      vocab_limit=vocab_limit)
  fn = make_generate_fn(cfg, sampling)
  B = opts.batch_size
  out: dict[str, dict[str, dict]] = {s.name: {} for s in subsets}
  for domain, docs in docs_by_domain.items():
    for s in subsets:
      generated: list[list[int]] = []
      for start in range(0, len(docs), B):
        batch = [d.prefix for d in docs[start:start + B]]
        n = len(batch)
        batch += [batch[0]] * (B - n)
        exclude = [list(s.exclude)] * B if cfg.is_moe else ()
        generated += generate(params, cfg, batch, sampling, exclude=exclude, fn=fn)[:n]
      out[s.name][domain] = score(generated, docs, opts.threshold)
      r = out[s.name][domain]
      log(f"extraction {domain} [{s.name}]: {100 * r['extracted']:.1f}% extracted, "
          f"mean similarity {r['similarity']:.3f} ({r['documents']} documents)")
  return out
