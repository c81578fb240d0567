"""prepare_data and packing on Apache Beam (DirectRunner, 2 worker processes) == in process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("apache_beam")

import tensorflow_datasets as tfds

from flexolmo_jax.data import (DataError, make_train_loader, pack_token_documents, packed_split,
                               prepare_dataset, resolve_dataset_dir, tokenizer_info,
                               train_bpe_tokenizer)
from flexolmo_jax.data import beam_map
from flexolmo_jax.data.packing import PackedRows
from flexolmo_jax.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM = {"runner": "direct", "num_workers": 2}
UNIT_BYTES = 6000  # several units (= shards) from a few small files


def _docs(n: int, tag: str) -> list[str]:
    return [f"{tag} {i}: the quick brown fox {i * 7} jumps over {i % 13} lazy dogs. é 日本"
            for i in range(n)]


def _inputs(root) -> list[str]:
    """Six files, with every kind of counted skip, spread over several units."""
    root.mkdir()
    for f in range(5):
        lines = [json.dumps({"text": t}) for t in _docs(60, f"f{f}")]
        lines[7] = "{not json"
        lines[11] = json.dumps({"body": "no text field"})
        lines[13] = json.dumps({"text": "   "})
        (root / f"{f}.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe bad utf8\n")
    (root / "empty.jsonl").write_bytes(b"")
    return [str(root)]


def _records(path: str) -> dict[str, list]:
    builder = tfds.builder_from_directory(path)
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        out[split] = [source[i] for i in range(len(source))]
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same inputs prepared in process and on Beam."""
    tmp = tmp_path_factory.mktemp("beam")
    inputs = _inputs(tmp / "in")
    kw = dict(validation_fraction=0.1, shard_input_bytes=UNIT_BYTES, relative_to=str(tmp))
    local = prepare_dataset("d", inputs, str(tmp / "local"), runner="in_process", **kw)
    beam = prepare_dataset("d", inputs, str(tmp / "beam"), **BEAM, **kw)
    return tmp, local, beam


def test_beam_dataset_is_record_for_record_the_in_process_one(both):
    _, local, beam = both
    a, b = tfds.builder_from_directory(local), tfds.builder_from_directory(beam)
    assert a.info.splits["train"].num_shards > 2  # several units, hence several shards
    for split in a.info.splits:
        assert a.info.splits[split].shard_lengths == b.info.splits[split].shard_lengths
    assert _records(local) == _records(beam)
    assert sum(len(r) for r in _records(local).values()) == 5 * 57
    # Statistics, bad-input counts and examples included: the metadata is the same.
    assert a.info.metadata == b.info.metadata
    skipped = a.info.metadata["skipped"]
    assert skipped["by_reason"] == {"empty_file": 1, "empty_text": 5, "invalid_json": 5,
                                    "invalid_utf8": 5, "missing_text_field": 5}
    assert skipped["examples"][0]["location"] == "in/0.jsonl:8"
    # The same shard files (array_record's compressed chunks need not be byte-identical).
    names = sorted(n for n in os.listdir(local) if ".array_record-" in n)
    assert names == sorted(n for n in os.listdir(beam) if ".array_record-" in n)
    assert not [n for n in os.listdir(os.path.dirname(beam)) if n.startswith(".")]


def test_beam_packing_equals_sequential_packing_and_the_loader_reads_it(both):
    tmp, local, beam = both
    texts = [r["text"].decode() for r in _records(local)["train"]]
    tok = str(tmp / "tok.json")
    train_bpe_tokenizer(texts, 300, tok)
    info = tokenizer_info(tok)
    ids = [e.ids for e in load_tokenizer(tok).encode_batch(texts, add_special_tokens=False)]
    for seq_len in (7, 64):
        expected = list(pack_token_documents(ids, seq_len, info.eos_id, info.pad_id))
        packs = [packed_split(local, "train", tok, seq_len)]
        if seq_len == 7:  # one Beam run (each costs seconds of worker start-up)
            packs.append(packed_split(beam, "train", tok, seq_len, **BEAM))
            assert len(packs[1].shards) > 2 and packs[1].shards == packs[0].shards
        for packed in packs:
            rows = PackedRows(packed)
            assert len(rows) == len(expected) == packed.num_rows
            got = rows.__getitems__(range(len(rows)))
            assert all((g["input_ids"] == row[:-1]).all() and (g["targets"] == row[1:]).all()
                       and g["loss_mask"].sum() == n for g, (row, n) in zip(got, expected))
            assert packed.num_tokens == sum(len(x) + 1 for x in ids)
    # The batch at step k depends on the rows, not on who packed them or how they are sharded.
    loaders = [make_train_loader(d, tok, 7, 4, seed=3, process_index=1, process_count=2)
               for d in (local, beam)]
    for step in (0, 5, 40):
        a, b = (ld.batch_at(step) for ld in loaders)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_beam_reports_the_same_bad_input_error(tmp_path):
    inputs = _inputs(tmp_path / "in")
    messages = []
    for runner in ({"runner": "in_process"}, BEAM):
        with pytest.raises(DataError) as err:
            prepare_dataset("s", inputs, str(tmp_path / "out"), strict=True,
                            shard_input_bytes=UNIT_BYTES, **runner)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].endswith("0.jsonl:8: invalid_json: Expecting property name enclosed in "
                                "double quotes (strict mode)")
    assert not [f for _, _, fs in os.walk(tmp_path / "out") for f in fs]


def test_runner_choice():
    assert isinstance(beam_map.make_runner("auto", input_bytes=1000), beam_map.InProcess)
    big = beam_map.make_runner("auto", 3, input_bytes=1 << 30)
    assert big.flags[:3] == ["--runner=DirectRunner", "--direct_num_workers=3",
                             "--direct_running_mode=multi_processing"]
    custom = beam_map.make_runner("DataflowRunner", 8, "--project=p --region=r")
    assert custom.flags == ["--runner=DataflowRunner", "--num_workers=8", "--project=p",
                            "--region=r"]
    with pytest.raises(DataError, match="needs a Beam runner"):
        beam_map.make_runner("in_process", pipeline_options="--project=p")


def test_killed_beam_pipeline_leaves_nothing_that_looks_complete(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    line = json.dumps({"text": "a document long enough to take some writing " * 20}) + "\n"
    for f in range(24):
        (root / f"{f:02d}.jsonl").write_text(line * 1200)  # ~1 MB each: 24 units
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flexolmo_jax.prepare_data", "--name=k", f"--input={root}",
           f"--out={out}", "--runner=direct", "--num_workers=2",
           f"--shard-input-bytes={1 << 20}"]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    partial = out / "k" / ".1.0.0.partial" / "k" / "1.0.0"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if partial.is_dir() and any(".array_record-" in n for n in os.listdir(partial)):
                break  # the write pass has started: shards are being written
            time.sleep(0.01)
        assert proc.poll() is None, "the pipeline ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Beam worker processes
        proc.wait()
    visible = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
               if "/." not in os.path.join(d, f)[len(str(out)):]]
    assert visible == []  # only hidden staging leftovers, never a dataset_info.json in view
    with pytest.raises(DataError):
        resolve_dataset_dir(str(out))
    # The next run clears the leftovers and publishes a complete dataset.
    path = prepare_dataset("k", [str(root)], str(out), runner="in_process",
                           shard_input_bytes=1 << 20)
    assert sum(len(r) for r in _records(path).values()) == 24 * 1200
    assert not (out / "k" / ".1.0.0.partial").exists()
