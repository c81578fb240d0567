"""prepare_data: formats, deterministic splits, statistics, and every bad input from the issue."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from flexolmo_jax.data import prepare_data
from flexolmo_jax.data import (DataError, dataset_stats, prepare_dataset, sample_documents,
                               train_bpe_tokenizer)
from flexolmo_jax.data import prepare as prepare_mod
from flexolmo_jax.data import tfds_builder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} {i}: the quick brown fox {i * 7} jumps. é ü 日本" for i in range(n)]


def _jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({field: t, "id": 1}) + "\n")
    return str(path)


def _texts(dataset_dir: str, split: str) -> list[str]:
    builder = tfds.builder_from_directory(dataset_dir)
    source = builder.as_data_source(split=split)
    return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def _visible_entries(out) -> list[str]:
    """Everything under out that a reader could mistake for a dataset (ignores nothing)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out):
        found += [os.path.join(dirpath, f) for f in filenames]
    return found


# ------------------------------------------------------------------------------------------
# Formats and splits


def test_all_formats_round_trip_and_open_with_plain_tfds(tmp_path):
    import zstandard

    texts = _docs(40)
    _jsonl(tmp_path / "a.jsonl", texts[:10])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in texts[10:20])
    (tmp_path / "c.ndjson.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[20:30]).encode()))
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts[30:35]):
        (tmp_path / "txt" / f"{i}.txt").write_text(t, encoding="utf-8")
    pq.write_table(pa.table({"text": texts[35:40], "n": list(range(5))}), tmp_path / "d.parquet")

    out = tmp_path / "out"
    path = prepare_dataset("mixed", [str(tmp_path / "*.json*"), str(tmp_path / "c.ndjson.zst"),
                                     str(tmp_path / "txt"), str(tmp_path / "d.parquet")],
                           str(out), validation_fraction=0.2)
    assert path == str(out / "mixed" / "1.0.0")
    train, val = _texts(path, "train"), _texts(path, "validation")
    assert sorted(train + val) == sorted(texts)  # nothing lost, nothing duplicated
    # The split is the documented pure function of the text.
    assert sorted(val) == sorted(t for t in texts if prepare_mod.split_value(t) < 0.2)
    stats = dataset_stats(path)
    assert stats["num_examples"] == {"train": len(train), "validation": len(val)}
    assert stats["splits"]["train"]["bytes"] == sum(len(t.encode()) for t in train)
    assert stats["skipped"]["total"] == 0
    assert len(stats["inputs"]) == 9  # a.jsonl, b.jsonl.gz, c.ndjson.zst, 5 txt, 1 parquet
    assert sample_documents(path, 5, seed=3) == sample_documents(path, 5, seed=3)
    assert set(sample_documents(path, 1000, seed=0)) == set(train)


def test_split_depends_only_on_content(tmp_path):
    texts = _docs(60)
    a = prepare_dataset("a", [_jsonl(tmp_path / "a.jsonl", texts)], str(tmp_path / "o1"),
                        validation_fraction=0.3)
    b = prepare_dataset("a", [_jsonl(tmp_path / "b.jsonl", texts[::-1])], str(tmp_path / "o2"),
                        validation_fraction=0.3)
    assert sorted(_texts(a, "validation")) == sorted(_texts(b, "validation"))
    assert _texts(a, "train") == _texts(b, "train")[::-1]  # input order is kept
    again = prepare_dataset("a", [str(tmp_path / "a.jsonl")], str(tmp_path / "o3"),
                            validation_fraction=0.3)
    assert dataset_stats(again)["splits"] == dataset_stats(a)["splits"]  # same digests


def test_tiny_dataset_still_gets_a_validation_document(tmp_path):
    texts = _docs(3)
    path = prepare_dataset("tiny", [_jsonl(tmp_path / "t.jsonl", texts)], str(tmp_path / "o"),
                           validation_fraction=0.01)
    val = _texts(path, "validation")
    assert len(val) == 1 and val[0] == min(texts, key=prepare_mod.split_value)
    only_train = prepare_dataset("t0", [str(tmp_path / "t.jsonl")], str(tmp_path / "o"),
                                 validation_fraction=0.0)
    assert list(tfds.builder_from_directory(only_train).info.splits) == ["train"]


# ------------------------------------------------------------------------------------------
# Bad input: errors name the file (and line), nothing is written


def test_missing_path_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        prepare_dataset("x", [str(tmp_path / "nope.jsonl")], str(out))
    assert not out.exists()


def test_directory_without_matching_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"/d: directory contains no supported files"):
        prepare_dataset("x", [str(tmp_path / "d")], str(tmp_path / "out"))
    with pytest.raises(DataError, match="pattern matched no files"):
        prepare_dataset("x", [str(tmp_path / "d" / "*.jsonl")], str(tmp_path / "out"))


def test_empty_file_is_a_counted_skip(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    good = _jsonl(tmp_path / "good.jsonl", _docs(5))
    path = prepare_dataset("x", [str(tmp_path / "empty.jsonl"), good], str(tmp_path / "out"))
    skipped = dataset_stats(path)["skipped"]
    assert skipped["by_reason"] == {"empty_file": 1}
    assert skipped["examples"][0]["location"].endswith("empty.jsonl")
    # Only empty input: an error, not an empty dataset.
    with pytest.raises(DataError, match="no usable documents"):
        prepare_dataset("y", [str(tmp_path / "empty.jsonl")], str(tmp_path / "out"))
    assert not (tmp_path / "out" / "y").exists()


def test_invalid_utf8_and_missing_field_are_counted_with_line_numbers(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in _docs(6)]
    lines.insert(2, b'{"text": "caf\xe9"}')  # latin-1 byte: invalid UTF-8 (line 3)
    lines.insert(4, b'{"body": "no text field"}')  # line 5
    lines.insert(5, b'{"text": 42}')  # line 6
    lines.insert(6, b'{"text": ')  # line 7: broken JSON
    lines.insert(7, b'{"text": "lone \\ud800 surrogate"}')  # line 8: valid JSON, not Unicode
    p.write_bytes(b"\n".join(lines) + b"\n")
    path = prepare_dataset("x", [str(p)], str(tmp_path / "out"))
    stats = dataset_stats(path)
    assert sum(stats["num_examples"].values()) == 6
    assert stats["skipped"]["by_reason"] == {
        "invalid_json": 1, "invalid_unicode": 1, "invalid_utf8": 1, "missing_text_field": 1,
        "text_not_a_string": 1}
    where = {e["reason"]: e["location"] for e in stats["skipped"]["examples"]}
    assert where["invalid_utf8"] == f"{p}:3" and where["missing_text_field"] == f"{p}:5"
    # --strict turns the first of them into an error naming file and line.
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid_utf8"):
        prepare_dataset("s", [str(p)], str(tmp_path / "out"), strict=True)


def test_invalid_utf8_txt_names_the_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine\nstill fine\nbroken \xff here\n")
    (tmp_path / "b.txt").write_text("a good document", encoding="utf-8")
    path = prepare_dataset("x", [str(tmp_path / "*.txt")], str(tmp_path / "out"))
    ex = dataset_stats(path)["skipped"]["examples"]
    assert ex[0]["reason"] == "invalid_utf8" and ex[0]["location"].endswith("a.txt:3")


def test_wrong_text_field_fails_instead_of_skipping_everything(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", _docs(10), field="content")
    with pytest.raises(DataError, match="missing_text_field"):
        prepare_dataset("x", [p], str(tmp_path / "out"))
    path = prepare_dataset("x", [p], str(tmp_path / "out"), text_field="content")
    assert sum(dataset_stats(path)["num_examples"].values()) == 10


def test_parquet_without_the_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: no column 'text'"):
        prepare_dataset("x", [str(tmp_path / "a.parquet")], str(tmp_path / "out"))


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_archive_is_an_error_and_leaves_nothing(tmp_path, codec):
    import zstandard

    payload = "".join(json.dumps({"text": t}) + "\n" for t in _docs(3000)).encode()
    blob = gzip.compress(payload) if codec == "gz" else zstandard.ZstdCompressor().compress(
        payload)
    p = tmp_path / f"cut.jsonl.{codec}"
    p.write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"cut.jsonl.{codec}: compressed stream is truncated "
                                        r"or corrupt after line \d+"):
        prepare_dataset("x", [str(p)], str(out))
    assert _visible_entries(out) == []


def test_failure_while_writing_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real = tfds_builder.write_dataset_info

    def crash_after_writing(*args, **kwargs):
        real(*args, **kwargs)  # the dataset is complete in the staging dir...
        raise KeyboardInterrupt  # ...and then the job is killed before publishing

    monkeypatch.setattr(tfds_builder, "write_dataset_info", crash_after_writing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("x", [_jsonl(tmp_path / "a.jsonl", _docs(20))], str(out))
    assert _visible_entries(out) == []


def test_inputs_changing_during_prepare_is_detected(tmp_path, monkeypatch):
    real = prepare_mod.readers.iter_documents
    calls = []

    def shrinking(files, field, log):  # the file loses its last line after the scan
        calls.append(1)
        docs = list(real(files, field, log))
        return iter(docs if len(calls) == 1 else docs[:-1])

    monkeypatch.setattr(prepare_mod.readers, "iter_documents", shrinking)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="input files changed while preparing"):
        prepare_dataset("x", [_jsonl(tmp_path / "a.jsonl", _docs(10))], str(out))
    assert _visible_entries(out) == []


def test_existing_dataset_needs_overwrite(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _docs(10))
    path = prepare_dataset("x", [a], str(tmp_path / "out"))
    with pytest.raises(DataError, match="already exists"):
        prepare_dataset("x", [a], str(tmp_path / "out"))
    b = _jsonl(tmp_path / "b.jsonl", _docs(4, tag="other"))
    prepare_dataset("x", [b], str(tmp_path / "out"), overwrite=True)
    assert sum(dataset_stats(path)["num_examples"].values()) == 4


# ------------------------------------------------------------------------------------------
# CLI


def test_cli_success_and_exit_codes(tmp_path, capsys):
    good = _jsonl(tmp_path / "a.jsonl", _docs(12))
    out = str(tmp_path / "out")
    assert prepare_data.main(["--name=cli", f"--input={good}", f"--out={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(summary["documents"].values()) == 12
    tok = tmp_path / "tok.json"
    train_bpe_tokenizer(_docs(50), 300, str(tok))
    assert prepare_data.main(["--name=packed", f"--input={good}", f"--out={out}",
                              f"--tokenizer={tok}", "--seq-len=8"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["packed"]["train"]["rows"] > 0
    assert prepare_data.main(["--name=cli2", f"--input={tmp_path / 'missing'}",
                              f"--out={out}"]) == 1
    assert "missing: no such file or directory" in capsys.readouterr().err


def test_cli_as_module_exits_nonzero_on_truncated_gzip(tmp_path):
    blob = gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n"
                                  for t in _docs(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[:-200])
    proc = subprocess.run(
        [sys.executable, "-m", "flexolmo_jax.prepare_data", "--name=x",
         f"--input={tmp_path / 'cut.jsonl.gz'}", f"--out={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "cut.jsonl.gz: compressed stream is truncated or corrupt after line" in proc.stderr
    assert _visible_entries(tmp_path / "out") == []
