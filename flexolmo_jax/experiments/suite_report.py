"""DIR/report.md of the experiments suite (experiments/suite.py): every seed's evaluation
results gathered, shown as mean +- std over seeds, and the paper's claims checked on them.

All numbers are validation cross-entropy in nats per token (lower is better), the same
batches for every model of a seed. Std is the sample standard deviation over seeds (0 with
one seed).
"""
from __future__ import annotations

import json
import pathlib
import statistics

from flexolmo_jax.experiments.demo import DOMAINS, EVAL_DOMAINS

MERGED = "merged (router-tuned)"
STITCHED = "merged as stitched"
COLUMNS = EVAL_DOMAINS + ("avg",)


def _loss(row) -> dict:
  out = {d: row["perplexity"][d]["loss"] for d in EVAL_DOMAINS}
  out["avg"] = sum(out.values()) / len(EVAL_DOMAINS)
  return out


def _with_avg(losses: dict) -> dict:
  out = {d: float(losses[d]) for d in EVAL_DOMAINS}
  out["avg"] = sum(out.values()) / len(EVAL_DOMAINS)
  return out


def seed_results(suite, seed: int) -> dict:
  """One seed's tables: {"main": {model: losses}, "opt_out": {row: losses}, "routing":
  {domain: [layer][expert]}, "ablations": {ablation: [(label, losses)]}}."""
  demo = suite.demo(seed)
  ev = demo.work / "eval"
  load = lambda n: json.loads((ev / n / "results.json").read_text())
  first = lambda n: next(iter(load(n)["rows"].values()))
  main = {"public": _loss(first("public"))}
  main.update({f"expert_{d} (2-expert)": _loss(first(f"expert_{d}")) for d in DOMAINS})
  merged = load("merged")["rows"]
  main[MERGED] = _loss(merged["all experts"])
  main[STITCHED] = _loss(first("merged_untuned"))
  base = json.loads((ev / "baselines.json").read_text())
  for key, label in (("soup", "model soup"), ("btm", "BTM ensemble"),
                     ("uniform", "uniform ensemble"), ("prompt", "prompt routing")):
    if base.get(key):
      main[label] = _with_avg(base[key])
  for b, label in (("btx", "BTX"), ("unrestricted", "unrestricted MoE (equal FLOPs)")):
    if b in suite.baselines:
      main[label] = _loss(first(b))
  ablations = {}
  for v in suite.variants_for(seed):
    rows = ablations.setdefault(v.ablation, [])
    if not rows:  # the reference each variant changes one thing of
      ref = (MERGED, main[MERGED]) if v.ablation in ("top_k", "router_tuning") else (
          STITCHED + " (default)", main[STITCHED])
      if v.ablation == "router_init":
        ref = (("mean hidden state" if suite.mean_is_default else "domain embedding")
               + " (default, as stitched)", main[STITCHED])
      elif v.ablation == "top_k":
        ref = ("top-2 (default, router-tuned)", main[MERGED])
      elif v.ablation == "public_mix":
        ref = (f"public share {suite.cfg.PUBLIC_MIX:g} (default, as stitched)", main[STITCHED])
      elif v.ablation == "bias":
        ref = ("learned bias (default, as stitched)", main[STITCHED])
      elif v.ablation == "router_tuning":
        ref = ("router-tuned (default)", main[MERGED])
      rows.append(ref)
    rows.append((v.label, main[STITCHED] if v.untuned else _loss(first(v.name))))
  routing = {d: merged["all experts"]["perplexity"][d]["routing"] for d in EVAL_DOMAINS}
  # Downstream accuracy of the models evaluated with the tasks (older workdirs: none).
  accuracy = {}
  for name, label in [("public", "public"), *[(f"expert_{d}", f"expert_{d} (2-expert)")
                                                for d in DOMAINS],
                      ("merged", MERGED), ("merged_untuned", STITCHED),
                      ("btx", "BTX"), ("unrestricted", "unrestricted MoE (equal FLOPs)")]:
    if not (ev / name / "results.json").exists():
      continue
    row = merged["all experts"] if name == "merged" else first(name)
    if all(d in row.get("tasks", {}) for d in EVAL_DOMAINS):
      accuracy[label] = _with_avg({d: row["tasks"][d]["acc"] for d in EVAL_DOMAINS})
  extraction = {}
  if (ev / "extraction" / "results.json").exists():
    for sub, row in load("extraction")["rows"].items():
      extraction[sub] = {d: row["extraction"][d]["extracted"] for d in DOMAINS}
      extraction[sub].update({f"sim {d}": row["extraction"][d]["similarity"] for d in DOMAINS})
  return {"main": main, "opt_out": {k: _loss(r) for k, r in merged.items()},
          "routing": routing, "experts": load("merged")["model"]["experts"],
          "ablations": ablations, "accuracy": accuracy, "extraction": extraction}


def mean_std(xs) -> tuple[float, float]:
  xs = [float(x) for x in xs]
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs, digits: int = 3) -> str:
  m, s = mean_std(xs)
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(per_seed: list[dict], header: str, columns=COLUMNS, scale: float = 1.0,
          digits: int = 3) -> list[str]:
  """{row: {column: value}} per seed -> markdown, every cell mean ± std over seeds (values
  times scale: 100 for percentages)."""
  lines = [f"| {header} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name in per_seed[0]:
    lines.append(f"| {name} | " + " | ".join(
        fmt([scale * s[name][c] for s in per_seed], digits) for c in columns) + " |")
  return lines


def extraction_lines(results: list[dict], docs: int, tokens: int) -> list[str]:
  """The extraction table (share of each owner's training documents the final model
  reproduces, per expert subset) and, per owner, opting its expert out against the public
  model's rate: the practical side of opt-out."""
  ex = [r["extraction"] for r in results if r.get("extraction")]
  if not ex:
    return []
  out = ["## Verbatim extraction (final model)", "",
         "Fraction of each owner's training documents whose greedy continuation of a 32-token "
         "prefix has normalised Levenshtein similarity >= 0.9 with the document (the "
         f"reference's protocol, shorter: {docs} documents per domain, {tokens} generated "
         f"tokens), mean ± std over {len(ex)} seed(s); `sim` columns: mean similarity.", ""]
  out += table(ex, "experts", [*DOMAINS, *(f"sim {d}" for d in DOMAINS)], 1.0, 3)
  public = next((k for k in ex[0] if k.endswith(" only")), None)
  out.append("")
  for d in DOMAINS:
    if f"-{d}" not in ex[0]:
      continue
    on = [e["all experts"][d] for e in ex]
    off = [e[f"-{d}"][d] for e in ex]
    line = (f"- opting out {d}: extracted {fmt([100 * x for x in on], 1)}% -> "
            f"{fmt([100 * x for x in off], 1)}% of its documents, similarity "
            f"{fmt([e['all experts'][f'sim {d}'] for e in ex])} -> "
            f"{fmt([e[f'-{d}'][f'sim {d}'] for e in ex])}")
    if public:
      line += (f" (public model: {fmt([100 * e[public][d] for e in ex], 1)}%, similarity "
               f"{fmt([e[public][f'sim {d}'] for e in ex])})")
    out.append(line + ".")
  return out


def claims(results: list[dict], has_unrestricted: bool) -> list[str]:
  """The paper's headline claims, each checked on every seed: 'reproduced' only if it holds
  on all of them; the spread is mean ± std over seeds."""
  mains = [r["main"] for r in results]
  out = ["## Claims", ""]

  def line(ok: bool | None, text: str):
    mark = "not run" if ok is None else ("reproduced" if ok else "not reproduced")
    out.append(f"- **{mark}**: {text}")

  # 1. merged beats the public model on every domain.
  per_seed = [all(m[MERGED][d] < m["public"][d] for d in EVAL_DOMAINS) for m in mains]
  gaps = ", ".join(f"{d} {fmt([m['public'][d] - m[MERGED][d] for m in mains])}"
                   for d in EVAL_DOMAINS)
  line(all(per_seed), f"merged < public on every domain (in {sum(per_seed)}/{len(mains)} "
       f"seeds); public - merged loss: {gaps}.")
  # 2. merged beats the best merging baseline (model soup, BTM).
  merging = [b for b in ("model soup", "BTM ensemble") if b in mains[0]]
  gap = [min(m[b]["avg"] for b in merging) - m[MERGED]["avg"] for m in mains]
  wins = [sum(m[MERGED][d] < min(m[b][d] for b in merging) for d in EVAL_DOMAINS)
          for m in mains]
  line(all(g > 0 for g in gap), f"merged < best merging baseline ({', '.join(merging)}) on "
       f"average loss (in {sum(g > 0 for g in gap)}/{len(mains)} seeds); best baseline - "
       f"merged: {fmt(gap)}; domains won per seed {wins} of {len(EVAL_DOMAINS)}.")
  # 3. merged vs the unrestricted MoE at equal training FLOPs.
  key = "unrestricted MoE (equal FLOPs)"
  if has_unrestricted and key in mains[0]:
    gap = [m[key]["avg"] - m[MERGED]["avg"] for m in mains]
    line(all(g >= 0 for g in gap), f"merged <= unrestricted MoE at equal training FLOPs on "
         f"average loss (in {sum(g >= 0 for g in gap)}/{len(mains)} seeds) although no "
         f"owner's data left its owner; unrestricted - merged: {fmt(gap)}.")
  else:
    line(None, "merged vs unrestricted MoE at equal FLOPs (no unrestricted stage in "
         "configs/flexmix_mini.py).")
  # 4. opting an expert out removes mainly its own domain.
  held, parts = [], []
  for d in DOMAINS:
    row = f"-{d}"
    own = [r["opt_out"][row][d] - r["opt_out"]["all experts"][d] for r in results]
    other = [max(r["opt_out"][row][o] - r["opt_out"]["all experts"][o]
                 for o in EVAL_DOMAINS if o != d) for r in results]
    held += [a > b for a, b in zip(own, other)]
    parts.append(f"-{d}: own +{fmt(own)} vs largest elsewhere {fmt(other)}")
  line(all(held), f"opting an expert out raises mainly its own domain's loss (in "
       f"{sum(held)}/{len(held)} expert x seed cases); " + "; ".join(parts) + ".")
  return out


def ablation_seeds(results: list[dict]) -> dict[str, list[dict]]:
  """{ablation: the seeds' results that ran it}, in the order the first seed ran them."""
  out = {}
  for r in results:
    for name in r["ablations"]:
      out.setdefault(name, []).append(r)
  return out


def _plots(results: list[dict], out_dir: pathlib.Path) -> dict[str, str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  files = {}
  # Losses of the main models, per domain, with the spread over seeds.
  mains = [r["main"] for r in results]
  names = list(mains[0])
  fig, ax = plt.subplots(figsize=(10, 4.5), layout="constrained")
  w = 0.8 / len(names)
  for i, name in enumerate(names):
    ms = [mean_std([m[name][d] for m in mains]) for d in EVAL_DOMAINS]
    ax.bar(np.arange(len(EVAL_DOMAINS)) + i * w, [a for a, _ in ms], w,
           yerr=[b for _, b in ms], label=name, capsize=2, color=plt.cm.tab20(i % 20))
  ax.set_xticks(np.arange(len(EVAL_DOMAINS)) + 0.4 - w / 2, EVAL_DOMAINS)
  ax.set_ylabel("validation loss (nats)")
  lows = [m[n][d] for m in mains for n in names for d in EVAL_DOMAINS]
  ax.set_ylim(min(lows) * 0.95, max(lows) * 1.02)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(f"Loss per domain, mean ± std over {len(results)} seeds")
  files["losses"] = out_dir / "losses.png"
  fig.savefig(files["losses"], dpi=110)
  plt.close(fig)
  # Opt-out matrix: change of loss against all experts, mean over seeds.
  rows = list(results[0]["opt_out"])
  delta = np.array([[statistics.fmean(r["opt_out"][row][d] - r["opt_out"]["all experts"][d]
                                      for r in results) for d in EVAL_DOMAINS] for row in rows])
  fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
  im = ax.imshow(delta, cmap="Reds", aspect="auto")
  for i in range(len(rows)):
    for j in range(len(EVAL_DOMAINS)):
      ax.text(j, i, f"{delta[i, j]:+.3f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(EVAL_DOMAINS)), EVAL_DOMAINS)
  ax.set_yticks(range(len(rows)), rows)
  fig.colorbar(im, ax=ax, label="loss change vs all experts (nats)")
  ax.set_title("Opt-out matrix (mean over seeds)")
  files["opt_out"] = out_dir / "opt_out.png"
  fig.savefig(files["opt_out"], dpi=110)
  plt.close(fig)
  # Routing of the merged model, averaged over seeds (the evaluator's heatmap).
  from flexolmo_jax.evaluate.report import routing_heatmap
  routing = {d: np.mean([np.asarray(r["routing"][d]) for r in results], axis=0).tolist()
             for d in EVAL_DOMAINS}
  fake = {"domains": list(EVAL_DOMAINS), "model": {"experts": results[0]["experts"]},
          "rows": {f"all experts, mean of {len(results)} seeds":
                   {"perplexity": {d: {"routing": routing[d]} for d in EVAL_DOMAINS}}}}
  files["routing"] = out_dir / "routing.png"
  if not routing_heatmap(fake, next(iter(fake["rows"])), files["routing"]):
    del files["routing"]
  # Ablations: average loss of each setting (over the seeds that ran it).
  abl = ablation_seeds(results)
  if abl:
    fig, axes = plt.subplots(1, len(abl), figsize=(3.2 * len(abl), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (name, runs) in zip(axes[0], abl.items()):
      settings = runs[0]["ablations"][name]
      ms = [mean_std([r["ablations"][name][i][1]["avg"] for r in runs])
            for i in range(len(settings))]
      ax.bar(range(len(settings)), [a for a, _ in ms], yerr=[b for _, b in ms], capsize=3,
             color=["tab:gray"] + ["tab:blue"] * (len(settings) - 1))
      ax.set_xticks(range(len(settings)), [s[0].split(" (")[0] for s in settings],
                    rotation=30, ha="right", fontsize=7)
      lo = min(a - b for a, b in ms)
      ax.set_ylim(lo * 0.97, max(a + b for a, b in ms) * 1.01)
      ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("average loss (nats)")
    files["ablations"] = out_dir / "ablations.png"
    fig.savefig(files["ablations"], dpi=110)
    plt.close(fig)
  return {k: str(pathlib.Path(v).relative_to(out_dir)) for k, v in files.items()}


def write(suite) -> str:
  """Gathers every seed, writes DIR/report.md (and its PNGs); returns the markdown."""
  from flexolmo_jax.experiments.suite import (ABLATIONS, EXTRACTION, TINY_EVAL_BATCHES,
                                              TINY_STEPS)
  results = [seed_results(suite, s) for s in range(suite.seeds)]
  n = len(results)
  out_dir = suite.work
  plots = _plots(results, out_dir)
  curves = suite.demo(0)._curves_png()
  lines = [f"# FlexOlmo experiments on FlexMix-mini (suite `paper`, scale `{suite.scale}`)", "",
           f"{n} training seed(s) (0..{n - 1}; the corpus is the same for all). Every cell is "
           f"validation cross-entropy in nats per token, **mean ± std over {n} seeds** "
           "(sample std; lower is better); avg = mean over the domains. "
           f"Merged = public + {len(DOMAINS)} experts ({', '.join(DOMAINS)}), top-2, router "
           "tuned on public data + proxies sampled from each owner's model."
           + (f" At tiny: {', '.join(f'{k} {v}' for k, v in TINY_STEPS.items())} training "
              f"steps and the first {TINY_EVAL_BATCHES} validation batches per domain (a smoke "
              "test of the pipeline, not a measurement)." if suite.scale == "tiny" else ""),
           "", "## Models", ""]
  lines += table([r["main"] for r in results], "model")
  lines += ["", *claims(results, "unrestricted" in suite.baselines), "",
            "## Opt-out matrix (merged, router-tuned)", "",
            "Each row opts the named expert out at inference (no retraining); "
            "`public only` is the public model.", ""]
  lines += table([r["opt_out"] for r in results], "experts")
  if plots.get("opt_out"):
    lines += ["", f"![opt-out matrix]({plots['opt_out']})"]
  acc = [r["accuracy"] for r in results if r.get("accuracy")]
  if acc:
    lines += ["", "## Downstream accuracy", "",
              "Accuracy (%) on the corpus's held-out 4-way multiple-choice task of each domain "
              "(chance 25%; math: the answer of a worked problem, others: the next line of a "
              f"validation document), mean ± std over {len(acc)} seed(s).", ""]
    lines += table(acc, "model", scale=100.0, digits=1)
  ex = extraction_lines(results, *EXTRACTION[suite.scale])
  if ex:
    lines += ["", *ex]
  abl = ablation_seeds(results)
  if abl:
    lines += ["", "## Ablations", "",
              "First row of each: the reference. Variants that retrain experts are compared as "
              "stitched (no router tuning) with the default experts as stitched; top-k and "
              "router tuning are evaluation-only changes of the router-tuned model.", ""]
    for name, runs in abl.items():
      per_seed = [{label: losses for label, losses in r["ablations"][name]} for r in runs]
      k = len(runs)
      lines += [f"### {name}: {ABLATIONS[name]}", ""]
      if k < n:
        lines += [f"Retrains the experts, so run on seeds 0..{k - 1} only "
                  f"(`--ablation_seeds={k}`): mean ± std over {k} seed(s).", ""]
      lines += table(per_seed, "setting") + [""]
      if name == "router_init" and suite.mean_is_default:
        lines += ["(No sentence embedder of width d_model at this scale: the default router "
                  "init is the public model's mean hidden state, so that variant is the "
                  "default row.)", ""]
    if plots.get("ablations"):
      lines += [f"![ablations]({plots['ablations']})", ""]
  lines += ["", "## Plots", "", f"![losses]({plots['losses']})"]
  if plots.get("routing"):
    lines += [f"![routing]({plots['routing']})"]
  lines += [f"![training curves, seed 0]({curves.relative_to(out_dir)})", "",
            "Per-seed results: `seed_S/eval/NAME/results.json` (and `results.md`, "
            "`routing.png`); baselines evaluated in the runner: `seed_S/eval/baselines.json`."]
  text = "\n".join(lines) + "\n"
  from flexolmo_jax.storage.atomic import write_text_atomic
  write_text_atomic(out_dir / "report.md", text)
  return text
