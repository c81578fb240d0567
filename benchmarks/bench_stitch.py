"""Stitch and to_hf at multi-GB scale: time against `cp` of the same bytes, and peak RSS.

  python benchmarks/bench_stitch.py [--root=/tmp/flexolmo_bench_stitch] [--sizes=1,4,8] [--keep]

Generates a dense public model and N expert checkpoints (2-expert models, bf16, saved with
`model_io.save_model_dir` exactly as training exports them: orbax OCDBT + zstd), then for each
size N: `cp -r` of the inputs, `python -m flexolmo_jax.stitch` (N experts -> N+1 slots),
`cp -r` of the stitched model, `python -m flexolmo_jax.convert to_hf` of it. Each command runs
as a child process; its own peak RSS comes from wait4(). Default model: 16 layers, d_model 1024,
16 heads, FFN 4608, vocab 50304 -- 0.62B params per expert checkpoint; stitched with 8 experts
(9 slots) it is 2.2B params, 4.4 GB in bf16. Disk: ~25 GB at the peak; everything is deleted at
the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def du(path) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def run(cmd, env=None) -> tuple[float, float, float]:
  """(seconds until exit, seconds until its writes are on disk, peak RSS MiB) of one child.

  `cp` of page-cached files returns long before its data reaches the disk, while a longer tool
  pays for write-back during its run; timing up to the end of a following `sync` compares the
  two fairly (both start from a synced state).
  """
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  dt = time.perf_counter() - t0
  err = proc.stderr.read().decode()
  proc.stderr.close()
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{err[-3000:]}")
  sync()
  return dt, time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def sync():
  subprocess.run(["sync"], check=False)  # untimed: flush the previous step's dirty pages


SETTLE_S = 10.0


def settle():
  """Untimed: flush, then wait until memory freed by the previous step is "cold".

  This VM hands freed memory back to the hypervisor after a few seconds (free page reporting);
  writing into such pages is ~10x slower than into pages freed a moment ago (measured: 1.3 GB
  in 2.6-2.9 s vs 0.23 s). A `cp` started right after deleting the previous copy got hot pages
  while a tool that starts a second later did not, so every timed command starts after this.
  """
  sync()
  time.sleep(SETTLE_S)


def generate(root: pathlib.Path, n_experts: int, a) -> None:
  """Public model + n expert checkpoints, one in memory at a time (run in a child process)."""
  import ml_dtypes
  import numpy as np
  from flexolmo_jax.storage import model_io
  from flexolmo_jax.model.config import ModelConfig

  bf16 = ml_dtypes.bfloat16
  L, d, H, I, V = a.layers, a.d_model, a.heads, a.ffn, a.vocab
  D = d // H
  cfg = ModelConfig(vocab_size=V, d_model=d, n_layers=L, n_heads=H, ffn_hidden=I,
                    param_dtype="bfloat16", dtype="bfloat16", eos_token_id=0, pad_token_id=1)

  def rand(seed, *shape):
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return (0.02 * x).astype(bf16)

  layers = {
      "self_attn": {"q_proj": rand(1, L, d, H, D), "k_proj": rand(2, L, d, H, D),
                    "v_proj": rand(3, L, d, H, D), "o_proj": rand(4, L, H, D, d),
                    "q_norm": {"scale": np.ones((L, H, D), bf16)},
                    "k_norm": {"scale": np.ones((L, H, D), bf16)}},
      "post_attention_layernorm": {"scale": np.ones((L, d), bf16)},
      "post_feedforward_layernorm": {"scale": np.ones((L, d), bf16)},
  }
  shared = {"embed_tokens": rand(5, V, d), "lm_head": rand(6, d, V),
            "norm": {"scale": np.ones((d,), bf16)}}
  ffn = {"gate_proj": rand(7, L, d, I), "up_proj": rand(8, L, d, I), "down_proj": rand(9, L, I, d)}
  model_io.save_model_dir(root / "public", {**shared, "decoder": {"layers": {**layers, "mlp": ffn}}},
                          cfg, {"stage": "public", "step": 1}, overwrite=True)
  r_pub = rand(10, d)
  for i in range(n_experts):
    name = f"domain{i}"
    ecfg = cfg.replace(num_experts=2, top_k=2, expert_bias=True, expert_names=("public", name))
    mlp = {k: np.stack([v, rand(100 + 3 * i + j, *v.shape)], axis=1)
           for j, (k, v) in enumerate(ffn.items())}
    mlp["router"] = np.stack([np.broadcast_to(r_pub, (L, d)), rand(200 + i, L, d)], axis=1)
    mlp["router_bias"] = np.zeros((L, 2), bf16)
    params = {**shared, "decoder": {"layers": {**layers, "mlp": mlp}}}
    model_io.save_model_dir(root / name, params, ecfg, {"stage": "expert", "step": 100 + i},
                            overwrite=True)
    del params, mlp
    print(f"generated {name}", flush=True)


def main():
  global SETTLE_S
  p = argparse.ArgumentParser()
  p.add_argument("--root", default="/tmp/flexolmo_bench_stitch")
  p.add_argument("--sizes", default="1,4,8")
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--ffn", type=int, default=4608)
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--settle", type=float, default=SETTLE_S,
                 help="seconds to wait (after sync) before each timed command")
  p.add_argument("--keep", action="store_true", help="keep the generated files")
  p.add_argument("--generate-only", type=int, default=0, help=argparse.SUPPRESS)
  a = p.parse_args()
  root = pathlib.Path(a.root)
  SETTLE_S = a.settle
  if a.generate_only:
    generate(root, a.generate_only, a)
    return
  sizes = sorted(int(s) for s in a.sizes.split(","))
  per_expert = 2 * (2 * a.vocab * a.d_model + a.layers * (4 * a.d_model ** 2 + 2 * 3 * a.d_model * a.ffn))
  need = 2 * per_expert * (max(sizes) + 1) + 2 * 2 * (2 * a.vocab * a.d_model + a.layers * (
      4 * a.d_model ** 2 + (max(sizes) + 1) * 3 * a.d_model * a.ffn))
  free = shutil.disk_usage(root.parent if root.parent.exists() else "/").free
  print(f"disk: need ~{need / 1e9:.1f} GB, free {free / 1e9:.1f} GB")
  if need > 0.8 * free:
    raise SystemExit("not enough free disk for this benchmark")
  root.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  results = []
  try:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, f"--root={root}", f"--generate-only={max(sizes)}",
                    f"--layers={a.layers}", f"--d-model={a.d_model}", f"--heads={a.heads}",
                    f"--ffn={a.ffn}", f"--vocab={a.vocab}"], env=env, check=True)
    print(f"generated inputs in {time.perf_counter() - t0:.0f}s")
    _, _, base_rss = run([sys.executable, "-c", "import flexolmo_jax.stitch.writer, "
                            "flexolmo_jax.convert.to_hf"], env)
    for n in sizes:
      inputs = [root / "public"] + [root / f"domain{i}" for i in range(n)]
      in_bytes = sum(du(x) for x in inputs)
      out, hf, copy = root / f"stitched{n}", root / f"hf{n}", root / "copy"
      t = {k: [] for k in ("cp_inputs", "stitch", "cp_stitched", "to_hf")}
      rss_st, rss_hf = [], []
      # Alternate cp and the tool, `repeats` times each, and keep the best time of each: the
      # machine is shared, so single timings swing by 2x either way.
      for _ in range(a.repeats):
        shutil.rmtree(out, ignore_errors=True)
        settle()
        copy.mkdir()
        t["cp_inputs"].append(run(["cp", "-r", *map(str, inputs), str(copy)])[:2])
        shutil.rmtree(copy)
        settle()
        *times, rss = run([sys.executable, "-m", "flexolmo_jax.stitch",
                           f"--public={root / 'public'}",
                           *[f"--expert=domain{i}={root / f'domain{i}'}" for i in range(n)],
                           f"--out={out}", "--no-progress", f"--workers={a.workers}"], env)
        t["stitch"].append(times)
        rss_st.append(rss)
      out_bytes = du(out)
      for _ in range(a.repeats):
        shutil.rmtree(hf, ignore_errors=True)
        settle()
        t["cp_stitched"].append(run(["cp", "-r", str(out), str(copy)])[:2])
        shutil.rmtree(copy)
        settle()
        *times, rss = run([sys.executable, "-m", "flexolmo_jax.convert", "to_hf",
                           f"--ckpt={out}", f"--out={hf}", "--no-progress",
                           f"--workers={a.workers}"], env)
        t["to_hf"].append(times)
        rss_hf.append(rss)
      hf_bytes = du(hf)
      best = {k: min(x[0] for x in v) for k, v in t.items()}  # until exit
      best_sync = {k: min(x[1] for x in v) for k, v in t.items()}  # until on disk
      r = {"experts": n, "slots": n + 1, "input_GB": in_bytes / 1e9,
           "stitched_GB": out_bytes / 1e9, "hf_GB": hf_bytes / 1e9,
           **{f"{k}_s": v for k, v in best.items()},
           **{f"{k}_synced_s": v for k, v in best_sync.items()},
           "stitch_vs_cp_inputs": best["cp_inputs"] / best["stitch"],
           "stitch_vs_cp_inputs_synced": best_sync["cp_inputs"] / best_sync["stitch"],
           "stitch_vs_cp_output": best["cp_stitched"] / best["stitch"],
           "to_hf_vs_cp": best["cp_stitched"] / best["to_hf"],
           "to_hf_vs_cp_synced": best_sync["cp_stitched"] / best_sync["to_hf"],
           "stitch_peak_rss_MiB": max(rss_st), "to_hf_peak_rss_MiB": max(rss_hf),
           "import_only_rss_MiB": base_rss, "all_times": t}
      results.append(r)
      print(json.dumps(r), flush=True)
      shutil.rmtree(out)
      shutil.rmtree(hf)
  finally:
    if not a.keep:
      shutil.rmtree(root, ignore_errors=True)
  print("\n| experts (slots) | read | written | cp inputs | stitch | ratio | cp output | to_hf "
        "| ratio | stitch RSS | to_hf RSS |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['experts']} ({r['slots']}) | {r['input_GB']:.2f} GB | {r['stitched_GB']:.2f} GB "
          f"| {r['cp_inputs_s']:.1f} / {r['cp_inputs_synced_s']:.1f} s "
          f"| {r['stitch_s']:.1f} / {r['stitch_synced_s']:.1f} s "
          f"| {r['stitch_vs_cp_inputs']:.2f}x / {r['stitch_vs_cp_inputs_synced']:.2f}x "
          f"| {r['cp_stitched_s']:.1f} / {r['cp_stitched_synced_s']:.1f} s "
          f"| {r['to_hf_s']:.1f} / {r['to_hf_synced_s']:.1f} s "
          f"| {r['to_hf_vs_cp']:.2f}x / {r['to_hf_vs_cp_synced']:.2f}x "
          f"| {r['stitch_peak_rss_MiB']:.0f} MiB | {r['to_hf_peak_rss_MiB']:.0f} MiB |")
  print("(times: until exit / until written to disk; ratio = cp time / tool time, higher is "
        f"better; python + imports alone: {results[0]['import_only_rss_MiB']:.0f} MiB RSS)")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
