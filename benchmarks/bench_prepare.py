"""prepare_data and packing throughput on the Beam DirectRunner: 1 vs 2 workers, peak RSS.

    python benchmarks/bench_prepare.py [--size-gb=1.0] [--extra-size-gb=0.25] [--workers=1,2]
                                       [--seq-len=2048] [--unit-mb=64]

Generates a JSONL corpus of --size-gb into a fresh /tmp directory (Zipf-distributed
pseudo-words, every document distinct), trains a byte-level BPE tokenizer (8192) on a sample,
then for each worker count runs, each in its own process so peak RSS is per phase:
  * prepare: prepare_dataset(runner=direct, num_workers=W), documents/s and input MB/s,
  * pack:    packed_split(train, runner=direct, num_workers=W), documents/s and tokens/s.
Peak RSS: the driver's own (ru_maxrss of the phase process) and the largest Beam worker's
(ru_maxrss of its children). --extra-size-gb repeats the largest worker count on a smaller
corpus: peak RSS that does not grow with the corpus is the claim being checked. Tokenizers'
own thread pool is disabled (TOKENIZERS_PARALLELISM=false) so W workers means W busy cores.
Everything under the /tmp directory is deleted at the end. Last line: one JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _generate(in_dir: str, size_bytes: int, file_bytes: int, seed: int = 0) -> dict:
    """JSONL files of about file_bytes each until size_bytes; returns counts."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    # A pool of document bodies, made distinct by their number: generation runs at disk speed.
    pool = [" ".join(vocab[i] for i in rng.choice(len(vocab), rng.integers(50, 500), p=p))
            for _ in range(4096)]
    os.makedirs(in_dir)
    written = docs = 0
    f = 0
    while written < size_bytes:
        path = os.path.join(in_dir, f"part-{f:05d}.jsonl")
        with open(path, "w") as fh:
            n = 0
            lines = []
            while n < file_bytes and written + n < size_bytes:
                line = json.dumps({"text": f"document {docs}. {pool[(docs * 7919) % len(pool)]}"})
                lines.append(line)
                n += len(line) + 1
                docs += 1
                if len(lines) == 4096:
                    fh.write("\n".join(lines) + "\n")
                    lines = []
            if lines:
                fh.write("\n".join(lines) + "\n")
        written += n
        f += 1
    return {"bytes": written, "documents": docs, "files": f, "sample": pool[:2000]}


def _child(args) -> None:
    """One phase in this process; prints its measurements as JSON."""
    from flexolmo_jax.data import packed_split, prepare_dataset

    t = time.perf_counter()
    if args.phase == "prepare":
        path = prepare_dataset("bench", [args.input], args.out, validation_fraction=0.01,
                               runner="direct", num_workers=args.num_workers,
                               shard_input_bytes=args.unit_mb << 20, overwrite=True)
        from flexolmo_jax.data import open_builder
        splits = open_builder(path).info.splits
        out = {"documents": sum(s.num_examples for s in splits.values()),
               "shards": splits["train"].num_shards}
    else:
        packed = packed_split(os.path.join(args.out, "bench", "1.0.0"), "train", args.tokenizer,
                              args.seq_len, runner="direct", num_workers=args.num_workers)
        out = {"documents": packed.num_documents, "tokens": packed.num_tokens,
               "rows": packed.num_rows, "shards": len(packed.shards)}
    out["seconds"] = time.perf_counter() - t
    out["driver_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _run_phase(phase: str, workers: int, corpus: str, out: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--phase={phase}",
           f"--input={corpus}", f"--out={out}", f"--num-workers={workers}",
           f"--tokenizer={args.tokenizer}", f"--seq-len={args.seq_len}",
           f"--unit-mb={args.unit_mb}"]
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{phase} with {workers} workers failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--extra-size-gb", type=float, default=0.25,
                   help="a second, smaller corpus (largest worker count only); 0: none")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--unit-mb", type=int, default=64, help="input MiB per work unit / shard")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)

    from flexolmo_jax.data import train_bpe_tokenizer

    workers = [int(w) for w in args.workers.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_prepare_", dir="/tmp")
    results = {"machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
               "seq_len": args.seq_len, "unit_mb": args.unit_mb, "runs": []}
    try:
        sizes = [(args.size_gb, workers)]
        if args.extra_size_gb:
            sizes.append((args.extra_size_gb, [max(workers)]))
        for size_gb, counts in sizes:
            corpus = os.path.join(tmp, f"in-{size_gb}")
            t = time.perf_counter()
            gen = _generate(corpus, int(size_gb * (1 << 30)), args.unit_mb << 20)
            print(f"corpus {size_gb} GB: {gen['documents']} documents in {gen['files']} files, "
                  f"generated in {time.perf_counter() - t:.0f}s", flush=True)
            args.tokenizer = os.path.join(tmp, "tokenizer.json")
            if not os.path.exists(args.tokenizer):
                train_bpe_tokenizer(gen["sample"], 8192, args.tokenizer)
            for w in counts:
                out = os.path.join(tmp, f"out-{size_gb}-{w}")
                run = {"size_gb": size_gb, "input_bytes": gen["bytes"], "workers": w}
                for phase in ("prepare", "pack"):
                    r = _run_phase(phase, w, corpus, out, args)
                    r["documents_per_s"] = r["documents"] / r["seconds"]
                    if phase == "prepare":
                        r["input_mb_per_s"] = gen["bytes"] / 2**20 / r["seconds"]
                    else:
                        r["tokens_per_s"] = r["tokens"] / r["seconds"]
                    run[phase] = r
                    print(f"{size_gb} GB, {w} worker(s), {phase}: {r['seconds']:.0f}s, "
                          f"{r['documents_per_s']:,.0f} docs/s"
                          + (f", {r['input_mb_per_s']:.1f} MB/s" if phase == "prepare"
                             else f", {r['tokens_per_s']:,.0f} tokens/s")
                          + f"; peak RSS driver {r['driver_rss_mb']:.0f} MB, "
                          f"largest worker {r['worker_rss_mb']:.0f} MB", flush=True)
                # Tokens the corpus holds / preparation time: the rate in the unit.
                run["prepare"]["tokens_per_s"] = run["pack"]["tokens"] / run["prepare"]["seconds"]
                results["runs"].append(run)
                shutil.rmtree(out)
            shutil.rmtree(corpus)
        by_w = {r["workers"]: r for r in results["runs"] if r["size_gb"] == args.size_gb}
        if 1 in by_w and 2 in by_w:
            results["speedup_2_vs_1"] = {
                ph: by_w[1][ph]["seconds"] / by_w[2][ph]["seconds"] for ph in ("prepare", "pack")}
            print(f"2 vs 1 workers: prepare x{results['speedup_2_vs_1']['prepare']:.2f}, "
                  f"pack x{results['speedup_2_vs_1']['pack']:.2f}")
        results["machine"]["load_avg_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
