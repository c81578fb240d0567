"""HuggingFace ``tokenizers`` JSON files: loading, special ids, vocab padding, and BPE training.

Any ``tokenizer.json`` works (dolma2's gives eos 100257, pad 100277, vocab 100278 -> 100352).
The project's own tokenizer is a byte-level BPE, so every string round-trips exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib

from collections.abc import Iterable

import tokenizers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers, trainers

from flexolmo_jax.data.errors import DataError
from flexolmo_jax.storage.paths import as_path

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Names other tokenizers use, tried in order when ours are absent.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")
VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  path: str
  vocab_size: int  # ids the tokenizer can emit (with added tokens)
  padded_vocab_size: int  # model vocabulary: next multiple of 128
  eos_id: int
  pad_id: int  # == eos_id when the tokenizer has no pad token; loss masks make that safe
  sha256: str  # of the canonical JSON: keys caches of tokenized data


def pad_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
  return -(-vocab_size // multiple) * multiple


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> tokenizers.Tokenizer:
  del mtime  # part of the cache key only, so an overwritten file is re-read
  try:
    tok = tokenizers.Tokenizer.from_str(epath.Path(path).read_text())  # any epath location
  except Exception as e:  # tokenizers raises bare Exception subclasses
    raise DataError(f"not a HuggingFace tokenizer.json ({e})", location=path) from e
  # Text that happens to contain "<|endoftext|>" must stay text: otherwise a document could
  # inject EOS/pad ids and break packing's one-EOS-per-document invariant.
  tok.encode_special_tokens = True
  return tok


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """The tokenizer at ``path`` (cached; do not mutate the returned object)."""
  p = as_path(path)
  if not p.is_file():
    raise DataError("tokenizer file not found", location=str(p))
  return _load(str(p), p.stat().mtime)


def _find(tok: tokenizers.Tokenizer, names: Iterable[str]) -> int | None:
  for name in names:
    i = tok.token_to_id(name)
    if i is not None:
      return i
  return None


def tokenizer_info(path: str) -> TokenizerInfo:
  tok = load_tokenizer(path)
  eos = _find(tok, _EOS_CANDIDATES)
  if eos is None:
    raise DataError(f"no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})",
                    location=path)
  pad = _find(tok, _PAD_CANDIDATES)
  vocab = tok.get_vocab_size(with_added_tokens=True)
  return TokenizerInfo(
      path=str(as_path(path)), vocab_size=vocab, padded_vocab_size=pad_vocab_size(vocab),
      eos_id=eos, pad_id=eos if pad is None else pad,
      sha256=hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest())


def padded_vocab_size(path: str) -> int:
  """Model vocabulary size for the tokenizer at ``path``: a multiple of 128."""
  return tokenizer_info(path).padded_vocab_size


def special_ids(path: str) -> tuple[int, int]:
  """(eos_id, pad_id) of the tokenizer at ``path``."""
  info = tokenizer_info(path)
  return info.eos_id, info.pad_id


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> TokenizerInfo:
  """Trains a byte-level BPE (GPT-2 style, no normaliser) and saves it as tokenizer.json.

  Deterministic for the same texts in the same order (checked in tests). Ids 0 and 1 are
  EOS and pad. The saved file is written to a temporary name and renamed.
  """
  tok = tokenizers.Tokenizer(models.BPE())
  # No normaliser and a byte-level decoder: decode(encode(s)) == s for every string.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  from flexolmo_jax.storage.atomic import write_text_atomic
  write_text_atomic(out_path, tok.to_str())
  return tokenizer_info(out_path)
