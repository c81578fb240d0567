"""Results table (markdown + JSON) and the routing heatmap (PNG), written atomically."""
from __future__ import annotations

import io
import json
import math

import numpy as np

from flexolmo_jax.storage.atomic import write_text_atomic
from flexolmo_jax.storage.paths import as_path


def table(results: dict) -> str:
  """One row per expert subset: perplexity per domain, then acc / acc_norm per task."""
  rows = results["rows"]
  domains = results["domains"]
  tasks = results["tasks"]
  head = ["experts"] + [f"ppl {d}" for d in domains]
  head += [f"{t} acc" for t in tasks] + [f"{t} acc_norm" for t in tasks]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in rows.items():
    cells = [name] + [_num(row["perplexity"][d]["ppl"]) for d in domains]
    # A row without task scores (--notasks_opt_out scores only the first row): "-".
    cells += [f"{100 * row['tasks'][t]['acc']:.1f}" if t in row["tasks"] else "-" for t in tasks]
    cells += [f"{100 * row['tasks'][t]['acc_norm']:.1f}" if t in row["tasks"] else "-"
              for t in tasks]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _num(x: float) -> str:
  return "nan" if not math.isfinite(x) else f"{x:.3f}"


def markdown(results: dict) -> str:
  m = results["model"]
  out = [f"# Evaluation of {m['path']}", "",
         f"{m['num_experts']} experts ({', '.join(m['experts']) or 'dense'}), top-{m['top_k']}; "
         f"perplexity on the `{results['split']}` split, seq_len {results['seq_len']}; "
         f"multiple choice in % (acc / length-normalised acc_norm).", "", table(results), ""]
  for name, row in results["rows"].items():
    if any(row["perplexity"][d]["routing"] for d in results["domains"]):
      out += [f"Share of tokens routed to each expert (mean over layers), {name}:", ""]
      experts = m["experts"]
      out.append("| domain | " + " | ".join(experts) + " |")
      out.append("|" + "---|" * (len(experts) + 1))
      for d in results["domains"]:
        share = np.mean(np.asarray(row["perplexity"][d]["routing"]), axis=0)
        out.append(f"| {d} | " + " | ".join(f"{s:.3f}" for s in share) + " |")
      out.append("")
      break  # the first row (all experts, or the requested subset)
  if results.get("extraction"):
    out += [extraction_table(results), ""]
  return "\n".join(out)


def extraction_table(results: dict) -> str:
  """Per expert subset and domain: % of training documents extracted (mean similarity)."""
  ex = results["extraction"]
  domains = ex["domains"]
  lines = [f"Verbatim extraction from the `{ex['split']}` split: {ex['prefix_len']}-token prefix, "
           f"{ex['gen_len']} greedy tokens, extracted when the normalised Levenshtein "
           f"similarity is >= {ex['threshold']}; % extracted (mean similarity).", "",
           "| experts | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
  for name, row in results["rows"].items():
    cells = [f"{100 * row['extraction'][d]['extracted']:.1f} "
             f"({row['extraction'][d]['similarity']:.3f})" for d in domains]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def routing_heatmap(results: dict, row_name: str, path) -> bool:
  """Per domain, a [layer x expert] heatmap of the share of tokens routed; False if none."""
  row = results["rows"][row_name]
  domains = [d for d in results["domains"] if row["perplexity"][d]["routing"]]
  if not domains:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  experts = results["model"]["experts"]
  n = len(domains) + 1
  width = 1.0 + n * (0.9 + 0.32 * len(experts))
  fig, axes = plt.subplots(1, n, figsize=(width, 4.5), squeeze=False, layout="constrained")
  mean = np.stack([np.mean(np.asarray(row["perplexity"][d]["routing"]), axis=0) for d in domains])
  panels = [("mean over layers", mean, domains)] + [
      (d, np.asarray(row["perplexity"][d]["routing"]), None) for d in domains]
  for i, (ax, (title, data, ylabels)) in enumerate(zip(axes[0], panels)):
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(experts)), experts, rotation=60, fontsize=7)
    if ylabels is not None:
      ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    else:
      layers = data.shape[0]
      ticks = list(range(0, layers, max(1, layers // 8)))
      ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)
      if i == 1:
        ax.set_ylabel("layer", fontsize=8)
  fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, label="share of tokens")
  fig.suptitle(f"Routing: share of tokens sent to each expert ({row_name})", fontsize=10)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  write_text_atomic(path, buf.getvalue())
  return True


def write_all(results: dict, out_dir) -> dict[str, str]:
  out = as_path(out_dir)  # any epath location: local, gs://...
  files = {"json": out / "results.json", "markdown": out / "results.md"}
  write_text_atomic(files["json"], json.dumps(results, indent=1) + "\n")
  write_text_atomic(files["markdown"], markdown(results) + "\n")
  first = next(iter(results["rows"]))
  png = out / "routing.png"
  if routing_heatmap(results, first, png):
    files["routing"] = png
  return {k: str(v) for k, v in files.items()}
