"""Tokenizer (training, round trip, special ids, vocab padding) and token-conserving packing."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import tokenizers

from flexolmo_jax.data import (DataError, pack_token_documents, packed_split, prepare_dataset,
                               tokenizer_info, train_bpe_tokenizer)
from flexolmo_jax.data.domain_gap import token_stream
from flexolmo_jax.data.packing import PackedRows
from flexolmo_jax.data.tokenizer import load_tokenizer, pad_vocab_size

_WORDS = ("alpha beta gamma delta epsilon zeta theta lambda sigma omega tensor shard expert "
          "router token batch epoch seed").split()


def _corpus(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(_WORDS) for _ in range(r.randint(1, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe_tokenizer(_corpus(300), 300, path)
    return path


# ------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("seq_len", [1, 7, 64, 10_000])
def test_packing_conserves_every_token(seq_len):
    r = random.Random(seq_len)
    docs = [[r.randint(2, 99) for _ in range(r.choice([0, 1, 5, 50, 300]))] for _ in range(80)]
    eos, pad = 0, 1
    rows = list(pack_token_documents(docs, seq_len, eos, pad))
    expected = [t for d in docs for t in d + [eos]]  # each document followed by one EOS
    targets = [t for row, n in rows for t in row[1:][:n]]
    inputs = [t for row, n in rows for t in row[:-1][:n]]
    assert targets == expected  # every token predicted exactly once, in order
    assert inputs == [eos] + expected[:-1]
    assert all(len(row) == seq_len + 1 and row.dtype == np.int32 for row, _ in rows)
    assert all(n == seq_len for _, n in rows[:-1])  # only the last row may be short
    assert len(rows) == -(-len(expected) // seq_len)
    last, n_last = rows[-1]
    assert (last[n_last + 1:] == pad).all()


def test_packed_split_matches_pure_packing_and_is_cached(tmp_path, tok_path):
    texts = _corpus(120, seed=1)
    with open(tmp_path / "a.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    ds = prepare_dataset("p", [str(tmp_path / "a.jsonl")], str(tmp_path / "out"),
                         validation_fraction=0.0)
    packed = packed_split(ds, "train", tok_path, 16)
    tok, info = load_tokenizer(tok_path), tokenizer_info(tok_path)
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    expected = list(pack_token_documents(ids, 16, info.eos_id, info.pad_id))
    rows = PackedRows(packed)
    assert len(rows) == len(expected) == packed.num_rows
    for i, (row, n) in enumerate(expected):
        ex = rows[i]
        assert (ex["input_ids"] == row[:-1]).all() and (ex["targets"] == row[1:]).all()
        assert ex["loss_mask"].sum() == n
    assert packed.num_tokens == sum(len(x) + 1 for x in ids)
    assert (token_stream(packed)[1:] == np.concatenate([x + [info.eos_id] for x in ids])).all()
    # Second call reuses the cache; another seq_len gets its own.
    stamp = os.path.getmtime(packed.row_files[0])
    assert packed_split(ds, "train", tok_path, 16).row_files == packed.row_files
    assert os.path.getmtime(packed.row_files[0]) == stamp
    assert packed_split(ds, "train", tok_path, 8).directory != packed.directory
    with pytest.raises(DataError, match="no split 'validation'"):
        packed_split(ds, "validation", tok_path, 16)


# ------------------------------------------------------------------------------------------
# Tokenizer


def test_bpe_training_is_deterministic_and_round_trips(tmp_path, tok_path):
    again = train_bpe_tokenizer(_corpus(300), 300, str(tmp_path / "t2.json"))
    assert again.sha256 == tokenizer_info(tok_path).sha256
    tok = load_tokenizer(tok_path)
    tricky = ["unseen wörds, 日本語, emoji 🙂\ttabs\r\n  spaces  ",
              "a literal <|endoftext|> and <|pad|> stay text", "", "\n\n\n"]
    for text in tricky:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    info = tokenizer_info(tok_path)
    assert info.eos_id not in tok.encode(tricky[1], add_special_tokens=False).ids
    assert (info.eos_id, info.pad_id) == (0, 1)


def test_vocab_padding_and_special_token_fallbacks(tmp_path, tok_path):
    info = tokenizer_info(tok_path)
    assert info.vocab_size == 300 and info.padded_vocab_size == 384
    assert [pad_vocab_size(v) for v in (1, 128, 129, 100_278)] == [128, 128, 256, 100_352]
    # A tokenizer with an EOS but no pad token: pad falls back to EOS.
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    bare.save(str(tmp_path / "bare.json"))
    assert tokenizer_info(str(tmp_path / "bare.json")).pad_id == 1
    none = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a"))
    none.save(str(tmp_path / "none.json"))
    with pytest.raises(DataError, match="no end-of-text token"):
        tokenizer_info(str(tmp_path / "none.json"))
    with pytest.raises(DataError, match="tokenizer file not found"):
        tokenizer_info(str(tmp_path / "absent.json"))
