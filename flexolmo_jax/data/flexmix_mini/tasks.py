"""Downstream tasks for FlexMix-mini: one multiple-choice task per domain, held out from every
training split, in the `evaluate --tasks` JSONL format (evaluate/multiple_choice.py).

- math: a freshly generated problem with its worked solution up to "Answer:"; the choices are
  its answer and the answers of three other problems of the same kind (same format), so only
  following the solution picks the right one. Problems whose text is in the training split are
  skipped.
- public, code, legal: continuation cloze on the domain's *validation* documents. The context
  is the text before a line (up to `context_chars`, starting at a line), the right choice that
  line, the others three lines of similar length from elsewhere in the domain's validation
  documents (so the domain's style does not give the answer away; its content does).

Deterministic for a seed: the same corpus gives the same tasks.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence

from flexolmo_jax.data import catalog, prepare
from flexolmo_jax.data.flexmix_mini import math_problems

NUM_CHOICES = 4
_MIN_LINE, _MAX_LINE = 16, 100  # characters of a cloze line (whitespace stripped)
_ANSWER = "Answer:"
_OVERLAP = 60  # characters of context that, with the answer, must not occur in training text


def math_task(n_items: int, train_texts: set[str], seed: int) -> list[dict]:
  """n_items problems (round-robin over the generators), each with 3 same-kind distractors."""
  r = random.Random(seed)
  items = []
  for i in range(n_items):
    gen = math_problems.GENERATORS[i % len(math_problems.GENERATORS)]
    text = gen(r)
    while text in train_texts:
      text = gen(r)
    head, _, answer = text.rpartition(_ANSWER)
    gold = " " + answer.strip()
    others: list[str] = []
    while len(others) < NUM_CHOICES - 1:  # other problems' answers, all distinct
      other = " " + gen(r).rpartition(_ANSWER)[2].strip()
      if other != gold and other not in others:
        others.append(other)
    items.append(_item(f"math-{i}", head + _ANSWER, gold, others, r))
  return items


def _lines(text: str) -> list[tuple[int, str]]:
  """(offset, line) of the lines of `text` that can be a cloze answer."""
  out, offset = [], 0
  for line in text.splitlines(keepends=True):
    body = line.strip()
    if _MIN_LINE <= len(body) <= _MAX_LINE and offset > 0:
      out.append((offset, line.rstrip("\n")))
    offset += len(line)
  return out


def cloze_task(domain: str, documents: Sequence[str], n_items: int, seed: int,
               context_chars: int = 240) -> list[dict]:
  """Up to n_items cloze items from `documents`, answers at distinct lines."""
  r = random.Random(seed)
  candidates = [(d, off, line) for d, text in enumerate(documents)
                for off, line in _lines(text)]
  if len(candidates) < NUM_CHOICES:
    return []
  order = list(range(len(candidates)))
  r.shuffle(order)
  items = []
  for k in order:
    d, off, line = candidates[k]
    text = documents[d]
    start = max(0, off - context_chars)
    start = text.find("\n", start - 1) + 1 if start > 0 else 0  # begin at a line
    context = text[start:off]
    if not context.strip():
      continue
    # Distractors: other lines, not from this context and not the answer's own text, of
    # lengths within a factor of 1.5 of the answer's.
    pool = [c for c in candidates if c[2].strip() != line.strip()
            and not (c[0] == d and start <= c[1] <= off + len(line))
            and len(line) / 1.5 <= len(c[2]) <= len(line) * 1.5]
    if len(pool) < NUM_CHOICES - 1:
      continue
    others = []
    for c in r.sample(pool, min(len(pool), 4 * NUM_CHOICES)):
      if c[2] not in others:
        others.append(c[2])
      if len(others) == NUM_CHOICES - 1:
        break
    if len(others) < NUM_CHOICES - 1:
      continue
    items.append(_item(f"{domain}-{len(items)}", context, line, others, r))
    if len(items) == n_items:
      break
  return items


def _item(item_id: str, context: str, gold: str, others: list[str], r: random.Random) -> dict:
  choices = [gold] + list(others)
  r.shuffle(choices)
  return {"id": item_id, "context": context, "choices": choices, "gold": choices.index(gold)}


def _texts(dataset_dir: str, split: str) -> list[str]:
  source = catalog.open_builder(dataset_dir).as_data_source(split=split)
  return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def write_tasks(root: str, domains: Sequence[str], n_items: int, seed: int) -> dict[str, int]:
  """ROOT/tasks/<domain>.jsonl for every domain; returns the item count of each.

  No item's answer, with the end of its context, occurs in any domain's training split (a
  validation document may share a paragraph with another domain's training text)."""
  import os
  from etils import epath
  out_dir = epath.Path(root) / "tasks"
  out_dir.mkdir(parents=True, exist_ok=True)
  train = {d: _texts(os.path.join(root, d), prepare.TRAIN) for d in domains}
  seen_in_training = "\x00".join(t for texts in train.values() for t in texts)
  counts = {}
  for domain in domains:
    if domain == "math":
      items = math_task(n_items, set(train[domain]), seed + 7919)
    else:
      items = cloze_task(domain, _texts(os.path.join(root, domain), prepare.VALIDATION),
                         n_items, seed)
      items = [it for it in items
               if it["context"][-_OVERLAP:] + it["choices"][it["gold"]] not in seen_in_training]
    with (out_dir / f"{domain}.jsonl").open("w") as fh:
      for item in items:
        fh.write(json.dumps(item) + "\n")
    counts[domain] = len(items)
  return counts
