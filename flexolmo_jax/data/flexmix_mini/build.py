"""Build FlexMix-mini: four prepared TFDS datasets, a BPE tokenizer, packed rows, statistics.

    OUT/raw/<domain>.jsonl.gz     the "owners' local files" (what a data owner would hold)
    OUT/<domain>/1.0.0/           prepare_data output for public, code, math, legal
    OUT/<domain>/1.0.0/packed/    rows for seq_len (the loader would build them on first use)
    OUT/tokenizer.json            byte-level BPE trained on the public train split only
    OUT/tasks/<domain>.jsonl      a multiple-choice task per domain, held out from training
                                  (tasks.py; `python -m flexolmo_jax.evaluate --tasks=...`)
    OUT/flexmix_mini.json         sizes, tokenizer, bigram cross-entropy between domains
    OUT/README.md                 the same, for people

The raw files go through the same prepare path as any owner's data. Everything is built in a
staging directory and renamed onto OUT at the end. Deterministic on a given machine (the code and
legal domains depend on the installed Python and packages; public and math do not).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from typing import Any

from etils import epath

from flexolmo_jax.data import catalog, domain_gap, packing, prepare, tokenizer
from flexolmo_jax.storage import atomic
from flexolmo_jax.storage.paths import as_path
from flexolmo_jax.data.errors import DataError
from flexolmo_jax.data.flexmix_mini import domains, math_problems, tasks

log = logging.getLogger(__name__)

# Bytes of UTF-8 text per domain at scale 1.0 (legal takes what the machine has, up to this).
BUDGETS = {"public": 1_500_000, "code": 1_500_000, "math": 1_000_000, "legal": 1_000_000}
DESCRIPTIONS = {
  "public": "English technical prose: pydoc_data reference topics + docstrings of half the "
       "stdlib modules",
  "code": "Python source of the other half of the stdlib modules (long modules cut at "
      "top-level statements)",
  "math": "generated arithmetic/algebra word problems with worked solutions (seeded)",
  "legal": "licence texts of the interpreter and installed distributions, repeated "
       "paragraphs removed",
}
DOMAINS = tuple(BUDGETS)
MIN_BYTES = 20_000  # below this a domain is too small to train or evaluate an expert


def default_dir() -> str:
  base = os.environ.get("FLEXOLMO_DATA_DIR", os.path.join("~", ".cache", "flexolmo_jax"))
  return os.path.join(os.path.expanduser(base), "flexmix_mini")


def collect(domain: str, budget: int, seed: int) -> list[tuple[str, str]]:
  if domain == "public":
    return domains.public_docs(budget)
  if domain == "code":
    return domains.code_docs(budget)
  if domain == "legal":
    return domains.legal_docs(budget)
  if domain == "math":
    return math_problems.math_docs(budget, seed=seed)
  raise ValueError(domain)


def _write_jsonl_gz(path: str, docs: list[tuple[str, str]]) -> None:
  # mtime=0 and no file name in the header: byte-identical output on every run.
  with epath.Path(path).open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                        mtime=0) as fh:
    for text, source in docs:
      fh.write((json.dumps({"text": text, "source": source}) + "\n").encode("utf-8"))


def build_flexmix_mini(out_dir: str | None = None, *, scale: float = 1.0,
            vocab_size: int = 8192, seq_len: int | None = 512,
            validation_fraction: float = 0.1, seed: int = 0,
            overwrite: bool = False, task_items: int = 200) -> dict[str, Any]:
  """Builds the corpus into ``out_dir`` (default: $FLEXOLMO_DATA_DIR/flexmix_mini or
  ~/.cache/flexolmo_jax/flexmix_mini) and returns its statistics."""
  out_dir = as_path(out_dir or default_dir())  # any epath: local or gs://
  if scale <= 0:
    raise DataError(f"scale must be positive, got {scale}")
  with atomic.staged_directory(out_dir, overwrite, error=DataError) as stage:
    root = os.fspath(stage.root)  # os.path.join on it is textual, so gs:// URLs survive
    (stage.root / "raw").mkdir(parents=True)
    stats: dict[str, Any] = {"scale": scale, "seed": seed, "seq_len": seq_len,
                 "validation_fraction": validation_fraction, "domains": {}}
    for name in DOMAINS:
      docs = collect(name, int(BUDGETS[name] * scale), seed)
      size = sum(len(t.encode("utf-8")) for t, _ in docs)
      if size < MIN_BYTES * min(scale, 1.0):
        raise DataError(f"domain {name!r}: only {size} bytes of text found on this "
                f"machine (need {int(MIN_BYTES * min(scale, 1.0))})")
      raw = os.path.join(root, "raw", f"{name}.jsonl.gz")
      _write_jsonl_gz(raw, docs)
      prepare.prepare_dataset(
        name, [raw], root, validation_fraction=validation_fraction, strict=True,
        description=f"FlexMix-mini {name}: {DESCRIPTIONS[name]}", relative_to=root)
      log.info("domain %s: %d documents, %d bytes", name, len(docs), size)

    public = catalog.open_builder(os.path.join(root, "public"))
    source = public.as_data_source(split=prepare.TRAIN)
    texts = (source[i]["text"].decode("utf-8") for i in range(len(source)))
    tok_path = os.path.join(root, "tokenizer.json")
    tok = tokenizer.train_bpe_tokenizer(texts, vocab_size, tok_path)
    stats["tokenizer"] = {"file": "tokenizer.json", "trained_on": "public/train",
               "vocab_size": tok.vocab_size,
               "padded_vocab_size": tok.padded_vocab_size,
               "eos_id": tok.eos_id, "pad_id": tok.pad_id, "sha256": tok.sha256}

    stats["tasks"] = tasks.write_tasks(root, DOMAINS, task_items, seed)

    streams: dict[str, dict[str, Any]] = {prepare.TRAIN: {}, prepare.VALIDATION: {}}
    for name in DOMAINS:
      info = catalog.dataset_stats(os.path.join(root, name))
      entry = {"description": DESCRIPTIONS[name], "documents": info["num_examples"],
           "bytes": {s: v["bytes"] for s, v in info["splits"].items()},
           "tokens": {}}
      for split in info["num_examples"]:
        packed = packing.packed_split(os.path.join(root, name), split, tok_path,
                       seq_len or 512)
        entry["tokens"][split] = packed.num_tokens
        streams[split][name] = domain_gap.token_stream(packed)
        if seq_len is None:  # only counted: leave no cache the caller did not ask for
          epath.Path(packed.directory).rmtree()
      stats["domains"][name] = entry
    stats["bigram_cross_entropy_nats"] = domain_gap.cross_entropy_matrix(
      streams[prepare.TRAIN], streams[prepare.VALIDATION], tok.padded_vocab_size)
    (stage.root / "flexmix_mini.json").write_text(json.dumps(stats, indent=1))
    (stage.root / "README.md").write_text(render_readme(stats))
  log.info("FlexMix-mini written to %s", out_dir)
  return stats


def render_readme(stats: dict[str, Any]) -> str:
  lines = ["# FlexMix-mini", "",
       "Built by `python -m flexolmo_jax.build_flexmix_mini` "
       f"(scale {stats['scale']}, seed {stats['seed']}). Each domain is a TFDS "
       "array_record dataset (`tfds.builder_from_directory(DIR/<domain>/1.0.0)`).", "",
       "| domain | source | documents (train / val) | bytes (train / val) | "
       "tokens (train / val) |", "|---|---|---|---|---|"]
  for name, d in stats["domains"].items():
    def pair(x):
      return f"{x.get('train', 0):,} / {x.get('validation', 0):,}"

    lines.append(f"| {name} | {d['description']} | {pair(d['documents'])} | "
           f"{pair(d['bytes'])} | {pair(d['tokens'])} |")
  t = stats["tokenizer"]
  lines += ["", f"Tokenizer: byte-level BPE trained on {t['trained_on']}, vocab "
       f"{t['vocab_size']} (model vocab {t['padded_vocab_size']}), eos {t['eos_id']}, "
       f"pad {t['pad_id']}. Tokens count every document token plus one EOS each.", "",
       "Downstream tasks (`tasks/<domain>.jsonl`, 4-way multiple choice; math: the answer "
       "of a new worked problem, others: the next line of a validation document): "
       + ", ".join(f"{d} {n}" for d, n in stats.get("tasks", {}).items()) + " items.", "",
       "Bigram cross-entropy (nats/token; rows: model fitted on that domain's train "
       "split, columns: validation split scored):", "",
       "| model \\ eval | " + " | ".join(stats["domains"]) + " |",
       "|---|" + "---|" * len(stats["domains"])]
  for model, row in stats["bigram_cross_entropy_nats"].items():
    lines.append(f"| {model} | " + " | ".join(f"{row[e]:.3f}" for e in stats["domains"])
           + " |")
  return "\n".join(lines) + "\n"
