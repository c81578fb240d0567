"""Loader: determinism, per-process disjointness and coverage, resumption, mixing, eval pass."""
from __future__ import annotations

import collections
import itertools
import json
import random

import numpy as np
import pytest

from flexolmo_jax.data import (DataError, make_eval_loader, make_train_loader, packed_split,
                               prepare_dataset, train_bpe_tokenizer)
from flexolmo_jax.data.packing import PackedRows

SEQ = 16
_WORDS = {
    "a": "red green blue cyan magenta yellow black white orange purple".split(),
    "b": "one two three four five six seven eight nine ten eleven".split(),
    "c": "cat dog cow pig hen fox owl bee ant elk yak".split(),
}


def _key(row: np.ndarray) -> bytes:
    return np.asarray(row, np.int32).tobytes()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    r = random.Random(0)
    dirs = {}
    for name, words in _WORDS.items():
        n_docs = {"a": 150, "b": 60, "c": 40}[name]
        with open(root / f"{name}.jsonl", "w") as fh:
            for i in range(n_docs):
                text = f"{name}{i} " + " ".join(r.choice(words) for _ in range(r.randint(3, 40)))
                fh.write(json.dumps({"text": text}) + "\n")
        dirs[name] = prepare_dataset(name, [str(root / f"{name}.jsonl")], str(root / "data"),
                                     validation_fraction=0.2)
    tok = str(root / "tok.json")
    all_text = [line for n in _WORDS for line in open(root / f"{n}.jsonl")]
    train_bpe_tokenizer(all_text, 400, tok)
    rows = {}
    for name, d in dirs.items():
        src = PackedRows(packed_split(d, "train", tok, SEQ))
        rows[name] = collections.Counter(_key(src[i]["input_ids"]) for i in range(len(src)))
        assert max(rows[name].values()) == 1  # rows are identifiable
    return {"dirs": dirs, "tok": tok, "rows": rows}


def _loader(world, sources=("a",), batch=8, seed=0, p=0, n=1, start=0, weights=None):
    specs = [(world["dirs"][s], w) for s, w in zip(sources, weights or [1.0] * len(sources))]
    return make_train_loader(specs, world["tok"], SEQ, batch, seed, process_index=p,
                             process_count=n, start_step=start)


def _equal(x, y) -> bool:
    return all(np.array_equal(x[k], y[k]) for k in ("input_ids", "targets", "loss_mask"))


def test_batch_layout(world):
    b = _loader(world, batch=8, n=2, p=1).batch_at(0)
    assert b["input_ids"].shape == b["targets"].shape == b["loss_mask"].shape == (4, SEQ)
    assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    assert np.array_equal(b["input_ids"][:, 1:], b["targets"][:, :-1])  # shifted by one


def test_same_seed_same_batches_different_seed_different(world):
    first = list(itertools.islice(iter(_loader(world, seed=5)), 12))
    second = list(itertools.islice(iter(_loader(world, seed=5)), 12))
    other = list(itertools.islice(iter(_loader(world, seed=6)), 12))
    assert all(_equal(x, y) for x, y in zip(first, second))
    assert not all(_equal(x, y) for x, y in zip(first, other))


@pytest.mark.parametrize("n_proc", [2, 4])
def test_processes_are_disjoint_and_together_cover_each_epoch(world, n_proc):
    batch = 8
    loaders = [_loader(world, batch=batch, seed=1, p=p, n=n_proc) for p in range(n_proc)]
    single = _loader(world, batch=batch, seed=1)
    rows = world["rows"]["a"]
    n_rows = sum(rows.values())
    steps = 2 * n_rows // batch + 1
    stream = []
    for k in range(steps):
        parts = [ld.batch_at(k)["input_ids"] for ld in loaders]
        # Process slices are consecutive pieces of the single-process global batch...
        assert np.array_equal(np.concatenate(parts), single.batch_at(k)["input_ids"])
        keys = [_key(r) for part in parts for r in part]
        assert len(set(keys)) == len(keys)  # ...and disjoint within the step
        stream += keys
    epoch1, epoch2 = stream[:n_rows], stream[n_rows: 2 * n_rows]
    assert collections.Counter(epoch1) == rows  # every row exactly once per epoch
    assert collections.Counter(epoch2) == rows
    assert epoch1 != epoch2  # re-shuffled each epoch


def test_resume_at_step_k_equals_uninterrupted_run(world):
    specs = dict(sources=("a", "b", "c"), weights=[0.5, 0.3, 0.2], batch=8, seed=3, n=2, p=1)
    straight = list(itertools.islice(iter(_loader(world, **specs)), 40))
    resumed = _loader(world, start=25, **specs)
    tail = list(itertools.islice(iter(resumed), 15))
    assert all(_equal(x, y) for x, y in zip(straight[25:], tail))
    assert _equal(resumed.batch_at(31), straight[31])


def test_mixture_weights_within_stated_tolerance(world):
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    loader = _loader(world, sources=tuple(weights), weights=list(weights.values()), batch=20,
                     seed=2)
    counts = collections.Counter()
    n = 0
    for batch in itertools.islice(iter(loader), 50):
        for row in batch["input_ids"]:
            k = _key(row)
            counts[next(s for s in weights if k in world["rows"][s])] += 1
            n += 1
    for s, w in weights.items():
        # Stated bound (loader.py): |share - w| <= 2 * n_sources / n + 0.02 * w.
        assert abs(counts[s] / n - w) <= 2 * len(weights) / n + 0.02 * w, (s, counts[s] / n)
    # And per step, not just on average: each global batch of 20 is 12 / 6 / 2.
    first = loader.batch_at(0)["input_ids"]
    per_source = collections.Counter(next(s for s in weights if _key(r) in world["rows"][s])
                                     for r in first)
    assert per_source == {"a": 12, "b": 6, "c": 2}


def test_bad_loader_arguments(world):
    with pytest.raises(DataError, match="multiple of the process count"):
        _loader(world, batch=6, n=4)
    with pytest.raises(DataError, match="positive number"):
        _loader(world, sources=("a", "b"), weights=[1.0, 0.0])
    with pytest.raises(DataError, match="no such dataset"):
        make_train_loader("/nonexistent/ds", world["tok"], SEQ, 8, 0, 0, 1)


@pytest.mark.parametrize("n_proc", [1, 3])
def test_eval_loader_is_one_deterministic_pass(world, n_proc):
    d = world["dirs"]["b"]
    packed = packed_split(d, "validation", world["tok"], SEQ)
    loaders = [make_eval_loader(d, world["tok"], SEQ, 6, process_index=p, process_count=n_proc)
               for p in range(n_proc)]
    per_proc = [list(ld) for ld in loaders]
    assert len({len(b) for b in per_proc}) == 1 and len(per_proc[0]) == len(loaders[0])
    assert [list(ld) for ld in loaders][0][0]["input_ids"].tolist() == \
        per_proc[0][0]["input_ids"].tolist()  # a second pass is identical
    got = collections.Counter()
    masked = 0.0
    for batches in per_proc:
        for b in batches:
            masked += float(b["loss_mask"].sum())
            for row, m in zip(b["input_ids"], b["loss_mask"]):
                if m.any():
                    got[_key(row)] += 1
    src = PackedRows(packed)
    assert got == collections.Counter(_key(src[i]["input_ids"]) for i in range(len(src)))
    assert masked == packed.num_tokens  # every validation token scored exactly once
