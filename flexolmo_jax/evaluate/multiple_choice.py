"""Multiple-choice tasks scored by log-likelihood, from local JSONL files.

Format: one example per line, either text (needs the model's tokenizer)

    {"context": "Question: What is 2 + 2?\\nAnswer:", "choices": [" 3", " 4"], "gold": 1}

or already tokenized (any tokenizer; the ids must be in the model's vocabulary)

    {"context_ids": [12, 7, 99], "choices_ids": [[5], [6, 8]], "gold": 0}

Optional "id". Any OLMES / lm-eval multiple-choice task can be exported to this: the context
is the rendered prompt (few-shot examples included), each choice the continuation exactly as
it is appended (usually with its leading space), gold the index of the right choice.

Each choice's score is the summed log-probability of its tokens given the context (context
and choice are tokenized separately; an empty context starts from the EOS token). Metrics:
acc = argmax of the summed log-likelihood; acc_norm = argmax of log-likelihood per character
of the choice (lm-eval's length normalisation; per token for tokenized tasks). A request
longer than the scoring window keeps its choice and drops context tokens from the left.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from etils import epath

from flexolmo_jax.data import DataError
from flexolmo_jax.storage.paths import as_path


@dataclasses.dataclass
class Example:
  context: list[int]
  choices: list[list[int]]
  gold: int
  lengths: list[float]  # normaliser of each choice (characters, or tokens)
  id: str


@dataclasses.dataclass
class Task:
  name: str
  path: str
  examples: list[Example]


def load_task(path: str, tokenizer=None, eos_id: int = 0, vocab_size: int | None = None) -> Task:
  path = os.fspath(as_path(path))  # any epath location: local, gs://...
  if not epath.Path(path).is_file():
    raise DataError("task file not found", location=path)
  name = epath.Path(path).name
  for suffix in (".jsonl", ".json"):
    name = name[:-len(suffix)] if name.endswith(suffix) else name
  examples = []
  with epath.Path(path).open("r") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        ex = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"not JSON ({e})", location=where) from None
      examples.append(_example(ex, where, tokenizer, eos_id, vocab_size, len(examples)))
  if not examples:
    raise DataError("task has no examples", location=path)
  return Task(name, path, examples)


def _example(ex, where, tokenizer, eos_id, vocab_size, index) -> Example:
  if not isinstance(ex, dict) or "gold" not in ex:
    raise DataError('expected an object with "context", "choices" and "gold" '
                    '(or "context_ids", "choices_ids", "gold")', location=where)
  if "choices_ids" in ex:
    context = [int(t) for t in ex.get("context_ids", [])]
    choices = [[int(t) for t in c] for c in ex["choices_ids"]]
    lengths = [float(len(c)) for c in choices]
  elif "choices" in ex:
    if tokenizer is None:
      raise DataError("text task needs a tokenizer (pass --tokenizer)", location=where)
    text = ex.get("context", "")
    if not isinstance(text, str) or not all(isinstance(c, str) for c in ex["choices"]):
      raise DataError('"context" and "choices" must be strings', location=where)
    context = tokenizer.encode(text, add_special_tokens=False).ids if text else []
    choices = [tokenizer.encode(c, add_special_tokens=False).ids for c in ex["choices"]]
    lengths = [float(max(len(c), 1)) for c in ex["choices"]]
  else:
    raise DataError('missing "choices" (or "choices_ids")', location=where)
  gold = ex["gold"]
  if not isinstance(gold, int) or not 0 <= gold < len(choices) or len(choices) < 2:
    raise DataError(f"gold must index one of >= 2 choices; got gold={gold!r} for "
                    f"{len(choices)} choices", location=where)
  if any(len(c) == 0 for c in choices):
    raise DataError("a choice tokenizes to nothing", location=where)
  if vocab_size is not None:
    bad = [t for t in context + sum(choices, []) if not 0 <= t < vocab_size]
    if bad:
      raise DataError(f"token id {bad[0]} outside the model's vocabulary ({vocab_size})",
                      location=where)
  return Example(context or [eos_id], choices, gold, lengths, str(ex.get("id", index)))


def requests(task: Task, seq_len: int, pad_id: int):
  """Rows [N, seq_len] (input_ids, targets, loss_mask) for every (example, choice) pair."""
  rows = [(ex.context, c) for ex in task.examples for c in ex.choices]
  n = len(rows)
  ids = np.full((n, seq_len), pad_id, np.int32)
  tgt = np.full((n, seq_len), pad_id, np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  for i, (ctx, cont) in enumerate(rows):
    if len(cont) > seq_len:
      raise DataError(f"a choice of {len(cont)} tokens does not fit the scoring window "
                      f"({seq_len}); raise --seq_len", location=task.path)
    tokens = (ctx + cont)[-(seq_len + 1):]
    L = len(tokens) - 1
    ids[i, :L] = tokens[:-1]
    tgt[i, :L] = tokens[1:]
    mask[i, L - len(cont):L] = 1.0
  return {"input_ids": ids, "targets": tgt, "loss_mask": mask}


def window(tasks: list[Task], max_len: int, multiple: int = 64) -> int:
  """Smallest multiple of `multiple` holding the longest request, at most max_len."""
  longest = max(len(ex.context) + max(len(c) for c in ex.choices) - 1
                for t in tasks for ex in t.examples)
  return max(1, min(max_len, -(-longest // multiple) * multiple))


def _global(arr: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def score_task(step, params, task: Task, seq_len: int, batch_size: int, pad_id: int,
               masks: dict[str, np.ndarray | None], batch_shardings) -> dict[str, dict]:
  """{subset: {acc, acc_norm, n, loglik: [[per choice] per example]}} for one task."""
  rows = requests(task, seq_len, pad_id)
  n = rows["input_ids"].shape[0]
  total = -(-n // batch_size) * batch_size
  padded = {k: np.concatenate([v, np.zeros((total - n, seq_len), v.dtype)]) for k, v in rows.items()}
  loglik = {name: np.zeros(total, np.float64) for name in masks}
  for start in range(0, total, batch_size):
    batch = {k: _global(v[start:start + batch_size], batch_shardings[k]) for k, v in padded.items()}
    for name, mask in masks.items():
      r = jax.device_get(step(params, batch, mask))
      loglik[name][start:start + batch_size] = np.asarray(r["loglik"], np.float64)
  out = {}
  for name in masks:
    ll, i, per_example = loglik[name][:n], 0, []
    correct = correct_norm = 0
    for ex in task.examples:
      k = len(ex.choices)
      scores = ll[i:i + k]
      i += k
      per_example.append(scores.tolist())
      correct += int(np.argmax(scores) == ex.gold)
      correct_norm += int(np.argmax(scores / np.asarray(ex.lengths)) == ex.gold)
    m = len(task.examples)
    out[name] = {"acc": correct / m, "acc_norm": correct_norm / m, "n": m, "loglik": per_example}
  return out
