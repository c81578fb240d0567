"""Loader throughput on the bench config (batch 8 x 512) versus what a training step consumes.

    python benchmarks/bench_loader.py [--data-dir=FLEXMIX_MINI_DIR] [--steps=300]
                                      [--train-tokens-per-s=N]

Without --data-dir, FlexMix-mini is built into a temporary directory first (seconds). Measures:
  * cold tokenize+pack throughput (all four domains, fresh cache),
  * steady-state iteration over a 4-domain weighted mixture (grain prefetch threads),
  * random access batch_at(k) for large k (the cost of resuming),
and peak RSS. With --train-tokens-per-s (a training step's consumption on the bench config) it
prints the ratio and whether the loader is at least 10x faster. Last line: one JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexolmo_jax.data import make_train_loader, packed_split  # noqa: E402
from flexolmo_jax.data.flexmix_mini import build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="a built FlexMix-mini (default: build one in a temp dir)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--train-tokens-per-s", type=float, default=None,
                   help="tokens/s one training step consumes on the bench config")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = os.path.join(tmp.name, "flexmix_mini")
        t = time.perf_counter()
        build.build_flexmix_mini(data_dir, seq_len=None)
        print(f"built FlexMix-mini in {time.perf_counter() - t:.1f}s")
    tok = os.path.join(data_dir, "tokenizer.json")
    domains = [os.path.join(data_dir, d) for d in build.DOMAINS]

    # Cold: tokenize + pack every train split into a fresh cache.
    cache = os.path.join(tmp.name, "pack-cache")
    t = time.perf_counter()
    packed_tokens = sum(packed_split(d, "train", tok, args.seq_len, cache_dir=cache).num_tokens
                        for d in domains)
    pack_s = time.perf_counter() - t

    t = time.perf_counter()
    loader = make_train_loader([(d, 1.0) for d in domains], tok, args.seq_len, args.batch,
                               seed=0, process_index=0, process_count=1, cache_dir=cache,
                               num_threads=args.num_threads)
    build_s = time.perf_counter() - t

    it = iter(loader)
    for _ in range(10):  # warm-up: threads started, first reads done
        next(it)
    t = time.perf_counter()
    for _ in range(args.steps):
        batch = next(it)
    iter_s = time.perf_counter() - t
    tokens = args.steps * batch["input_ids"].size
    loader_tps = tokens / iter_s

    t = time.perf_counter()
    for k in range(20):
        loader.batch_at(1_000_003 * (k + 1))
    resume_ms = (time.perf_counter() - t) / 20 * 1e3

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    summary = {
        "config": {"batch": args.batch, "seq_len": args.seq_len, "sources": len(domains),
                   "threads": args.num_threads, "cpus": os.cpu_count()},
        "pack_tokens_per_s": round(packed_tokens / pack_s),
        "loader_build_s": round(build_s, 3),
        "loader_tokens_per_s": round(loader_tps),
        "loader_batches_per_s": round(args.steps / iter_s, 1),
        "batch_at_large_k_ms": round(resume_ms, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
    }
    if args.train_tokens_per_s:
        ratio = loader_tps / args.train_tokens_per_s
        summary.update(train_tokens_per_s=args.train_tokens_per_s, ratio=round(ratio, 1),
                       at_least_10x=ratio >= 10)
    print(f"tokenize+pack: {summary['pack_tokens_per_s']:,} tokens/s "
          f"({packed_tokens:,} tokens in {pack_s:.2f}s)")
    print(f"loader: {summary['loader_tokens_per_s']:,} tokens/s over {args.steps} batches of "
          f"{args.batch}x{args.seq_len}; batch_at(k~1e6): {resume_ms:.2f} ms; "
          f"peak RSS {peak_rss_mb:.0f} MB")
    if args.train_tokens_per_s:
        print(f"ratio to training consumption ({args.train_tokens_per_s:,.0f} tokens/s): "
              f"{summary['ratio']}x ({'OK' if summary['at_least_10x'] else 'TOO SLOW'}, need 10x)")
    print(json.dumps(summary))
    tmp.cleanup()


if __name__ == "__main__":
    main()
