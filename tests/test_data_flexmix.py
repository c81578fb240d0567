"""FlexMix-mini at reduced size: opens with tfds, round-trips, domains differ, math is right."""
from __future__ import annotations

import json
import os
import random
import re
from fractions import Fraction

import pytest
import tensorflow_datasets as tfds

from flexolmo_jax.data.flexmix_mini import cli
from flexolmo_jax.data import (DataError, load_tokenizer, make_train_loader, sample_documents,
                               tokenizer_info)
from flexolmo_jax.data.flexmix_mini import build, math_problems

SCALE = 0.03  # ~30-45 KB per domain: seconds to build


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fm") / "flexmix_mini")
    assert cli.main([f"--out={out}", f"--scale={SCALE}", "--vocab-size=1024",
                     "--seq-len=64"]) == 0
    return out


def test_layout_and_plain_tfds(mini):
    stats = json.load(open(os.path.join(mini, "flexmix_mini.json")))
    assert list(stats["domains"]) == ["public", "code", "math", "legal"]
    for name, d in stats["domains"].items():
        builder = tfds.builder_from_directory(os.path.join(mini, name, "1.0.0"))
        assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == \
            d["documents"]
        assert d["documents"]["train"] > 0 and d["documents"]["validation"] > 0
        assert d["tokens"]["train"] > d["documents"]["train"]
    assert tokenizer_info(os.path.join(mini, "tokenizer.json")).padded_vocab_size == 1024
    readme = open(os.path.join(mini, "README.md")).read()
    assert all(f"| {name} |" in readme for name in stats["domains"])
    assert not [f for f in os.listdir(os.path.dirname(mini)) if ".partial" in f]


def test_tokenizer_round_trip_on_every_document(mini):
    tok = load_tokenizer(os.path.join(mini, "tokenizer.json"))
    for name in build.DOMAINS:
        for split in ("train", "validation"):
            docs = sample_documents(os.path.join(mini, name), 10_000, seed=0, split=split)
            enc = tok.encode_batch(docs, add_special_tokens=False)
            assert [tok.decode(e.ids, skip_special_tokens=False) for e in enc] == docs, name


def test_domains_differ_enough_for_an_expert_to_help(mini):
    ce = json.load(open(os.path.join(mini, "flexmix_mini.json")))["bigram_cross_entropy_nats"]
    for name in ("code", "math", "legal"):
        # The domain's own model beats the public model on the domain's held-out text.
        assert ce[name][name] < ce["public"][name] - 0.3, (name, ce)


def test_build_is_deterministic_and_refuses_to_clobber(mini, tmp_path):
    again = str(tmp_path / "again")
    build.build_flexmix_mini(again, scale=SCALE, vocab_size=1024, seq_len=64)

    def fingerprint(root):
        stats = json.load(open(os.path.join(root, "flexmix_mini.json")))
        metas = [json.load(open(os.path.join(root, n, "1.0.0", "metadata.json")))["splits"]
                 for n in build.DOMAINS]
        tasks = [open(os.path.join(root, "tasks", f"{n}.jsonl")).read() for n in build.DOMAINS]
        return stats, metas, tasks

    assert fingerprint(again) == fingerprint(mini)
    with pytest.raises(DataError, match="already exists"):
        build.build_flexmix_mini(again, scale=SCALE)


def test_mini_feeds_the_loader(mini):
    sources = [(os.path.join(mini, n), 1.0) for n in build.DOMAINS]
    loader = make_train_loader(sources, os.path.join(mini, "tokenizer.json"), 64, 8, seed=0,
                               process_index=0, process_count=1)
    batch = loader.batch_at(0)
    assert batch["input_ids"].shape == (8, 64) and batch["loss_mask"].sum() > 0
    assert batch["input_ids"].max() < 1024


def test_math_answers_are_correct():
    r = random.Random(7)
    for _ in range(200):
        text = math_problems.arithmetic(r)
        expr = re.search(r"Evaluate (.*)\.\n", text).group(1)
        assert Fraction(eval(expr)) == int(re.search(r"Answer: (-?\d+)", text).group(1))
        text = math_problems.linear_equation(r)
        a, b, c = re.search(r"Solve for x: (-?\d*)x ([+-] \d+) = (-?\d+)", text).groups()
        a = {"": 1, "-": -1}[a] if a in ("", "-") else int(a)
        x = int(re.search(r"Answer: x = (-?\d+)", text).group(1))
        assert a * x + int(b.replace(" ", "")) == int(c)
        text = math_problems.quadratic(r)
        roots = [int(v) for v in re.findall(r"x = (-?\d+)", text.split("Answer:")[1])]
        b, c = _quadratic_coefficients(text)
        assert all(x * x + b * x + c == 0 for x in roots)


def _quadratic_coefficients(text: str) -> tuple[int, int]:
    m = re.search(r"Solve x\^2( [+-] \d*x)?( [+-] \d+)? = 0", text)
    lin, const = m.group(1), m.group(2)

    def num(s, default):
        if not s:
            return default
        s = s.replace(" ", "").rstrip("x")
        return int(s + "1") if s in "+-" else int(s)

    return num(lin, 0), num(const, 0)


def test_downstream_tasks_are_held_out_and_load_in_the_evaluator(mini):
    from flexolmo_jax.evaluate import multiple_choice
    stats = json.load(open(os.path.join(mini, "flexmix_mini.json")))
    tok = load_tokenizer(os.path.join(mini, "tokenizer.json"))
    for domain in build.DOMAINS:
        path = os.path.join(mini, "tasks", f"{domain}.jsonl")
        items = [json.loads(line) for line in open(path)]
        assert len(items) == stats["tasks"][domain] > 0
        task = multiple_choice.load_task(path, tok, eos_id=0)
        assert len(task.examples) == len(items)
        train = "\x00".join(sample_documents(os.path.join(mini, domain), 10**6, 0, "train"))
        valid = sample_documents(os.path.join(mini, domain), 10**6, 0, "validation")
        for it in items:
            gold = it["choices"][it["gold"]]
            assert len(it["choices"]) == len(set(it["choices"])) == 4
            if domain == "math":
                assert it["context"].endswith("Answer:") and "Solution:" in it["context"]
                assert it["context"] + gold + "\n" not in train
            else:  # the right choice is the line that really follows the context
                assert any(it["context"] + gold in doc for doc in valid)
                assert it["context"][-60:] + gold not in train
