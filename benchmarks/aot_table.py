"""The README's AOT planner table in one command: JSON + a markdown table.

  python benchmarks/aot_table.py [--out=/tmp/aot_table] [--rows=KEY,...] [--variants=before,after]
      [--after="attention=splash,logits_chunk=1024"] [--timeout=3600] [--reuse]

Every (row, variant) is one `python -m flexolmo_jax.aot ... --json_out` child process, run one
after another (a big TPU compile takes several GB of host memory); its wall time and its own
peak RSS (wait4) are recorded. Variants:
  before  --config.model.attention=xla --config.model.logits_chunk=0 (materialised attention
          scores and [B, T, V] logits)
  after   the config's defaults with the `--after` model overrides (splash attention and a
          chunked LM head + loss)
A variant left out of --variants is reported as not run; --reuse keeps the plans an earlier
(interrupted) run left in OUT. Writes OUT/table.json (every plan,
with its command, wall time and peak RSS) and OUT/table.md; for the Mixtral row, also the
PLANNER_ANCHOR block for flexolmo_jax/aot/calibration.py that its plan implies (from the
`before` plan when it ran, else `after`), and every row's MFU estimate is recomputed with it.
Needs libtpu (`pip install -e '.[tpu]'`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
         "collective-permute")
EXPERT_2X7B = "configs/flexolmo_2x7b.py:math"
MOE_8X7B = "configs/flexolmo_8x7b.py"
# Long context needs the rotary table and the data shape to allow it.
LONG = ["--seq_len=32768", "--config.model.max_seq_len=32768", "--per_device_batch=1"]

# key -> (label, config, topology, mode, flags). Meshes as in the README's AOT section:
# expert training FSDP over every chip; the 37B evaluation fsdp x tensor=4.
ROWS = {
    "2x7b_expert_4k_v5p64": ("flexolmo_2x7b expert training", EXPERT_2X7B, "v5p:4x4x4", "train",
                             ["--seq_len=4096", "--per_device_batch=2"]),
    "2x7b_expert_32k_v5p64": ("flexolmo_2x7b expert training", EXPERT_2X7B, "v5p:4x4x4",
                              "train", LONG),
    "2x7b_expert_4k_v6e64": ("flexolmo_2x7b expert training", EXPERT_2X7B, "v6e:8x8", "train",
                             ["--seq_len=4096", "--per_device_batch=2"]),
    "2x7b_expert_32k_v6e64": ("flexolmo_2x7b expert training", EXPERT_2X7B, "v6e:8x8", "train",
                              LONG),
    # Pure FSDP does not fit v6e at 32k (one sequence per chip is the least it allows); a
    # tensor pair shares each sequence.
    "2x7b_expert_32k_v6e64_tensor2": ("flexolmo_2x7b expert training", EXPERT_2X7B, "v6e:8x8",
                                      "train", [*LONG[:2], "--global_batch_size=32",
                                                "--config.mesh.fsdp=32", "--config.mesh.tensor=2"]),
    # Router tuning back-propagates through every layer (to each layer's router): full remat.
    "8x7b_router_v5p64": ("flexolmo_8x7b router tuning", MOE_8X7B, "v5p:4x4x4", "train",
                          ["--seq_len=4096", "--per_device_batch=2",
                           "--config.model.remat_policy=full"]),
    "8x7b_eval_v5p8": ("flexolmo_8x7b (37B) evaluation", MOE_8X7B, "v5p:2x2x2", "eval",
                       ["--seq_len=4096", "--per_device_batch=1", "--config.mesh.fsdp=2",
                        "--config.mesh.tensor=4"]),
    "8x7b_eval_v6e16": ("flexolmo_8x7b (37B) evaluation", MOE_8X7B, "v6e:4x4", "eval",
                        ["--seq_len=4096", "--per_device_batch=1", "--config.mesh.fsdp=4",
                         "--config.mesh.tensor=4"]),
    "mixtral_8x7b": ("Mixtral-8x7B (calibration anchor)", "configs/mixtral_8x7b.py", "v5p:4x4x8",
                     "train", ["--per_device_batch=12"]),
}
BEFORE = ["--config.model.attention=xla", "--config.model.logits_chunk=0"]


def after_flags(spec: str) -> list[str]:
  return [f"--config.model.{kv.strip()}" for kv in spec.split(",") if kv.strip()]


def command(key: str, variant: str, after: str, json_out: pathlib.Path) -> list[str]:
  _, config, topology, mode, flags = ROWS[key]
  extra = BEFORE if variant == "before" else after_flags(after)
  return [sys.executable, "-m", "flexolmo_jax.aot", f"--config={ROOT / config}",
          f"--topology={topology}", f"--mode={mode}", *flags, *extra, f"--json_out={json_out}"]


def run_one(cmd: list[str], log: pathlib.Path, timeout: float) -> dict:
  """Run one plan as a child; its exit status, wall time and own peak RSS (wait4)."""
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = t0 + timeout
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if time.perf_counter() > deadline:
        proc.kill()
        pid, status, usage = os.wait4(proc.pid, 0)
        status = -9
        break
      time.sleep(1.0)
  return {"rc": os.waitstatus_to_exitcode(status) if status != -9 else "timeout",
          "wall_s": time.perf_counter() - t0, "peak_rss_gib": usage.ru_maxrss / 2 ** 20}


def _error_tail(log: pathlib.Path) -> str:
  lines = [l for l in log.read_text(errors="replace").splitlines()
           if l.strip() and not l.startswith(("W0000", "I0000", "E0000", "WARNING"))]
  return lines[-1][:300] if lines else ""


def _f(x, fmt="{:.1f}", none="-"):
  return none if x is None else fmt.format(x)


def _pair(b, a, key, fmt="{:.1f}"):
  """'before -> after' of one field."""
  vb = b.get(key) if b else None
  if a is None:
    return f"{_f(vb, fmt)} -> (not run)"
  return f"{_f(vb, fmt)} -> {_f(a.get(key), fmt)}"


def markdown(results: dict) -> str:
  head = ("| step | topology (chips) | mesh | batch x seq | per-chip GB, HBM: before -> after | "
          "fits | executed TFLOP/chip: jaxpr / XLA | model TFLOP/chip | executed / model | "
          "collectives GB/chip (AG / RS / AR / A2A / RA2A / CP) | temporaries GB | "
          "largest scores GB | "
          "largest logits GB | roofline step (bound) | est. MFU (calibrated) | wall / peak RSS |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for key in sorted(results, key=lambda k: list(ROWS).index(k) if k in ROWS else len(ROWS)):
    row = results[key]
    b, a = row["variants"].get("before"), row["variants"].get("after")
    show = a if a and "model_flops" in a else b
    if show is None or "model_flops" not in show:
      err = (a or b or {}).get("error_tail", "no result")
      lines.append(f"| {row['label']} | {row['topology']} | | | failed: {err} |" + " |" * 11)
      continue
    mesh = ", ".join(f"{k}={v}" for k, v in show["mesh"].items() if v > 1) or "1 chip"
    fits = "/".join(("yes" if v["fits"] else "**no**") for v in (b, a) if v and "fits" in v)
    xla = show.get("xla_flops_per_chip")
    flops = f"{show['executed_flops_per_chip'] / 1e12:.0f} / {_f(xla and xla / 1e12, '{:.0f}')}"
    c = show.get("collectives_per_chip")
    by_kind = " / ".join(f"{c.get(k, 0) / GB:.2f}" for k in KINDS) if c else ""
    coll = f"{c['total'] / GB:.2f} ({by_kind})" if c else "-"
    bound = (f"{show['roofline_step_s'] * 1e3:.0f} ms ({show['bound']}"
             + ("" if show["roofline_complete"] else "; HBM/ICI unknown")
             + ("; costs batch-extrapolated" if show.get("costs_from") == "layers and batch"
                else "") + ")")
    mfu = _f(show.get("calibrated_mfu") and 100 * show["calibrated_mfu"], "{:.1f}%")
    cost = " + ".join(f"{v['wall_s'] / 60:.1f} min / {v['peak_rss_gib']:.1f} GiB"
                      for v in (b, a) if v)
    lines.append(
        f"| {row['label']} | {row['topology']} ({show['chips']}) | {mesh} | "
        f"{show['global_batch']} x {show['seq_len']} | "
        f"{_pair(b, a, 'total_gb')} ({show['hbm_gb']:.0f}) | {fits} | {flops} | "
        f"{show['model_flops_per_chip'] / 1e12:.0f} | {show['executed_over_model']:.2f} | {coll} | "
        f"{_pair(b, a, 'temporaries_gb')} | {_pair(b, a, 'largest_scores_gb', '{:.2f}')} | "
        f"{_pair(b, a, 'largest_logits_gb', '{:.2f}')} | {bound} | {mfu} | {cost} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="/tmp/aot_table")
  ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated keys of ROWS")
  ap.add_argument("--variants", default="before,after")
  ap.add_argument("--after", default="attention=splash,logits_chunk=1024",
                  help="model overrides of the `after` variant (k=v,...)")
  ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per plan")
  ap.add_argument("--reuse", action="store_true",
                  help="keep plans already in OUT (a resumed run) instead of re-planning them")
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  keys = [k for k in args.rows.split(",") if k]
  unknown = sorted(set(keys) - set(ROWS))
  if unknown:
    ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
  variants = [v for v in args.variants.split(",") if v]
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
  meta = {"commit": commit + ("+uncommitted" if dirty else ""),
          "date": datetime.date.today().isoformat(), "after": args.after}
  table_json = out / "table.json"
  results = json.loads(table_json.read_text())["rows"] if table_json.exists() else {}
  for key in keys:
    label, _, topology, mode, _ = ROWS[key]
    row = results.setdefault(key, {"label": label, "topology": topology, "mode": mode,
                                   "variants": {}})
    row.update(label=label, topology=topology, mode=mode)
    for variant in variants:
      json_out = out / f"{key}.{variant}.json"
      if args.reuse and json_out.exists() and "wall_s" in row["variants"].get(variant, {}):
        print(f"[{key} {variant}] reused", flush=True)
        continue
      json_out.unlink(missing_ok=True)
      cmd = command(key, variant, args.after, json_out)
      print(f"[{key} {variant}] {' '.join(cmd[1:])}", flush=True)
      run = run_one(cmd, out / f"{key}.{variant}.log", args.timeout)
      plan = json.loads(json_out.read_text()) if json_out.exists() else {}
      if not plan:
        plan["error_tail"] = _error_tail(out / f"{key}.{variant}.log")
      plan.update(run, command=" ".join(cmd[1:]).replace(str(ROOT) + "/", ""))
      row["variants"][variant] = plan
      print(f"  rc {run['rc']}, {run['wall_s']:.0f} s, peak RSS {run['peak_rss_gib']:.2f} GiB"
            + (f": {plan['error_tail']}" if "error_tail" in plan else ""), flush=True)
      table_json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
  from flexolmo_jax.aot import calibration
  anchor = calibration.ANCHOR
  mix = results.get("mixtral_8x7b", {}).get("variants", {})
  # The `before` plan: xla attention's FLOPs are exact, a Pallas kernel's a grid upper bound.
  anchor_plan = next((mix[v] for v in ("before", "after")
                      if "t_compute_s" in mix.get(v, {})), None)
  source = "the stored PLANNER_ANCHOR (aot/calibration.py)"
  if anchor_plan:
    # Calibrate every row on this table's own anchor plan: one code state throughout.
    eff = calibration.efficiency_of(anchor_plan)
    source = f"this table's Mixtral row (efficiency {eff:.3f})"
    for row in results.values():
      for plan in row["variants"].values():
        if "roofline_step_s" in plan:
          plan.update(calibration.calibrate(plan, eff))
    table_json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
  md = markdown(results)
  md += (f"\n\nMeasured at {meta['commit']} on {meta['date']}; `after` = config defaults + "
         f"{args.after}. Est. MFU: the roofline step divided by one efficiency factor "
         f"calibrated on {anchor['name']} ({100 * anchor['mfu']:.1f}% measured; MaxText's "
         f"Mixtral is 52.6% on v5p-256 and 35.2% on v6e-256) through {source}: an estimate "
         "from one anchor.\n")
  if anchor_plan:
    block = calibration.anchor_block(anchor_plan, meta["commit"], meta["date"])
    (out / "planner_anchor.py").write_text(block + "\n")
    print(f"\nPLANNER_ANCHOR implied by the Mixtral row (aot/calibration.py):\n{block}")
  (out / "table.md").write_text(md)
  print("\n" + md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
