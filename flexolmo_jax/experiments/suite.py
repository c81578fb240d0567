"""The paper's experiments on FlexMix-mini: the FlexOlmo lifecycle, its baselines and
ablations, over several training seeds, into one report.

  python -m flexolmo_jax.experiments --suite=paper --workdir=DIR [--seeds=3]
      [--scale=small|tiny] [--jobs=2] [--ablations=router_init,bias,router_tuning,top_k,public_mix]
      [--ablation_seeds=K] [--public_mix_shares=0,0.5]

The corpus is built once (DIR/flexmix_mini); each seed (DIR/seed_S, `--config.seed=S` in every
training) runs the demo's stages (experiments/demo.py: the same `Demo`, every stage its own
process, skipped when its output exists, so an interrupted suite resumes where it stopped):
  public model -> domain embeddings -> the experts (each owner's own process) -> stitch ->
  router tuning (proxies sampled from each owner's model) -> evaluation,
plus the baselines: model soup, BTM (posterior and uniform ensembles), prompt-based routing
(evaluated in the runner), BTX (the stitched model fine-tuned on all data) and the
unrestricted MoE (same architecture, random init, all data, the lifecycle's training FLOPs),
and the ablations (--ablations, default all):
  router_init    router rows from the domain embedding (default) / the public model's mean
                 hidden state / random unit vectors: experts retrained
  bias           the experts' learned negative bias off: experts retrained
  public_mix     share of public data in expert training (default PUBLIC_MIX): experts retrained
  router_tuning  the merged model as stitched vs router-tuned (evaluation only)
  top_k          experts per token at inference (evaluation only)
Within a seed, the public model, embeddings and default experts are trained once and reused
by every variant that does not change them. --ablation_seeds=K runs the ablations that
retrain experts on seeds 0..K-1 only (their tables are then mean +- std over K seeds).
Variants that retrain experts are compared as
stitched (no router tuning) with the default experts as stitched.

Writes DIR/report.md: loss per domain as mean +- std over seeds (main table, opt-out matrix,
each ablation), the paper's claims each marked reproduced or not, and PNG plots beside it
(losses, opt-out matrix, routing heatmap, ablations, training curves).
Exit status: 0 done, 1 a stage failed or bad input, 2 usage (bad --suite / --ablations).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import pathlib
import time

from absl import app, flags

from flexolmo_jax import cli
from flexolmo_jax.experiments.demo import (CONFIG, DOMAINS, EVAL_DOMAINS, EXTRACTION, Demo,
                                           ROOT, compilation_cache_env)

FLAGS = flags.FlagValues()
_SUITE = flags.DEFINE_enum("suite", None, ["paper"], "Which experiments: paper (the FlexOlmo "
                           "paper's claims, baselines and ablations).", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage and the report write.",
                               flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds (0..N-1).", lower_bound=1,
                              flag_values=FLAGS)
_SCALE = flags.DEFINE_enum("scale", "small", ["small", "tiny"], "Model and corpus size.",
                           flag_values=FLAGS)
_JOBS = flags.DEFINE_integer("jobs", 2, "Independent stages run this many at a time.",
                             lower_bound=1, flag_values=FLAGS)
_ABLATIONS = flags.DEFINE_string("ablations", "all", "Comma-separated ablations, 'all' or "
                                 "'none'.", flag_values=FLAGS)
_ABLATION_SEEDS = flags.DEFINE_integer(
    "ablation_seeds", None, "Run the ablations that retrain experts on the first K seeds only "
    "(default: every seed); the evaluation-only ones (top_k, router_tuning), the headline rows "
    "and the claims use every seed. Each retraining ablation costs about one more round of "
    "expert training per seed, so this bounds the suite's time.", lower_bound=1,
    flag_values=FLAGS)
_MIX_SHARES = flags.DEFINE_string(
    "public_mix_shares", None, "Shares of public data in expert training that the public_mix "
    "ablation compares with the default (comma-separated; default 0,0.5 at small, 0 at tiny).",
    flag_values=FLAGS)
flags.mark_flags_as_required(["suite", "workdir"], flag_values=FLAGS)

ABLATIONS = {
    "router_init": "router initialisation of each expert's row",
    "bias": "the experts' learned negative bias",
    "router_tuning": "router tuning on public data + proxies",
    "top_k": "experts per token at inference",
    "public_mix": "share of public data in expert training",
}
# At tiny the suite runs in a test: shorter trainings, a few evaluation batches per domain,
# and the checkpoints of the demo's 20-step runs skipped (only the final export is written).
TINY_STEPS = {"public": 8, "expert": 5, "router": 4, "btx": 4}
TINY_EVAL_BATCHES = 4
TINY_EMBED_SAMPLES = 32
# The public_mix ablation's shares of public data in expert training (against PUBLIC_MIX).
MIX_SHARES = {"small": (0.0, 0.5), "tiny": (0.0,)}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One ablation setting. Experts are retrained unless it is eval-only (top_k, untuned)."""
  name: str  # output suffix: expert_<domain>_<name>, merged_<name>, eval/<name>
  ablation: str
  label: str
  embeddings: str = "default"  # default | mean | random (router rows at expert init)
  overrides: tuple = ()  # --config.x=y of the expert trainings
  public_mix: float | None = None
  top_k: int | None = None  # eval-only: the final model at this top-k
  untuned: bool = False  # eval-only: the merged model as stitched

  @property
  def trains(self) -> bool:
    return self.top_k is None and not self.untuned


def parse_ablations(value: str) -> list[str]:
  names = [n for n in cli.parse_names(value or "none") if n != "none"]
  if names == ["all"]:
    return list(ABLATIONS)
  bad = [n for n in names if n not in ABLATIONS]
  if bad or "all" in names:
    raise app.UsageError(f"unknown --ablations {bad or ['all (alone)']}; choose from "
                         f"{', '.join(ABLATIONS)}, 'all' or 'none'")
  return names


def variants(ablations, scale: str, mean_is_default: bool, public_mix: float,
             mix_shares=None) -> list[Variant]:
  """The ablation settings to run. mean_is_default: the default router init already is the
  mean hidden state (no sentence embedder of width d_model), so that variant is the default.
  mix_shares: the public_mix ablation's shares (default MIX_SHARES of the scale)."""
  out = []
  if "router_init" in ablations:
    if not mean_is_default:
      out.append(Variant("init_mean", "router_init", "mean hidden state", embeddings="mean"))
    out.append(Variant("init_random", "router_init", "random", embeddings="random"))
  if "bias" in ablations:
    out.append(Variant("bias_off", "bias", "no bias", overrides=("--config.model.expert_bias=False",)))
  if "public_mix" in ablations:
    for mix in MIX_SHARES[scale] if mix_shares is None else mix_shares:
      if mix != public_mix:
        out.append(Variant(f"mix_{int(round(100 * mix))}", "public_mix",
                           f"public share {mix:g}", public_mix=mix))
  if "router_tuning" in ablations:
    out.append(Variant("untuned", "router_tuning", "as stitched (no router tuning)", untuned=True))
  if "top_k" in ablations:
    out += [Variant(f"topk_{k}", "top_k", f"top-{k}", top_k=k) for k in (1, 3, 4)]
  return out


def _config_module():
  spec = importlib.util.spec_from_file_location("flexmix_mini_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Suite:

  def __init__(self, work: pathlib.Path, seeds: int, scale: str, jobs: int, ablations,
               ablation_seeds: int | None = None, mix_shares=None):
    self.work, self.seeds, self.scale, self.jobs = work, seeds, scale, jobs
    self.ablation_seeds = min(seeds, ablation_seeds or seeds)
    self.ablations = list(ablations)
    self.cfg = _config_module()
    self.data = work / "flexmix_mini"
    # One XLA compilation cache for every stage: the suite runs the same few programs (same
    # shapes) in tens of processes, and on CPU compiling is much of a small stage's time.
    self.env = compilation_cache_env(work)
    self.stage_flags = {}
    if scale == "tiny":
      self.stage_flags = {k: [f"--config.train.steps={v}", "--config.checkpoint.every=1000"]
                          for k, v in TINY_STEPS.items()}
      self.stage_flags["unrestricted"] = ["--config.checkpoint.every=1000",
                                          f"--config.train.steps={self.unrestricted_steps()}"]
    self.eval_batches = TINY_EVAL_BATCHES if scale == "tiny" else None
    self.t0 = time.time()
    first = self.demo(0)
    self.mean_is_default = "--embedder=self" in first.default_embedder()
    self.variants = variants(self.ablations, scale, self.mean_is_default, self.cfg.PUBLIC_MIX,
                             mix_shares)
    # The baseline trainings exist where configs/flexmix_mini.py has their stages.
    self.baselines = [b for b in ("btx", "unrestricted") if b in getattr(self.cfg, "STAGES", ())]

  def variants_for(self, seed: int) -> list[Variant]:
    """The ablation settings seed runs: the evaluation-only ones on every seed, those that
    retrain experts on the first --ablation_seeds seeds."""
    return [v for v in self.variants if not v.trains or seed < self.ablation_seeds]

  def demo(self, seed: int, tag: str | None = None) -> Demo:
    demo = Demo(self.work / f"seed_{seed}", self.scale, True, self.jobs, seed=seed,
                data=self.data, env=self.env, stage_flags=self.stage_flags,
                tag=f"seed {seed}: " if tag is None else tag)
    demo.t0 = self.t0  # one clock for the whole suite
    if self.scale == "tiny":
      demo.embed_samples = TINY_EMBED_SAMPLES
    return demo

  def unrestricted_steps(self) -> int:
    """Equal training FLOPs with the lifecycle as this suite runs it (TINY_STEPS at tiny)."""
    from flexolmo_jax.experiments import flop_budget
    configs = self.cfg.lifecycle_configs(self.scale)
    for name, c in configs.items():
      c.train.steps = TINY_STEPS[name.split("_")[0]]
    budget = sum(flop_budget.lifecycle_flops(configs).values())
    return flop_budget.matched_steps(budget, self.cfg.get_config("unrestricted,tiny"))

  # --- one seed ---------------------------------------------------------------------------

  def run_seed(self, seed: int):
    demo = self.demo(seed)
    demo.train_public()
    self._embeddings(demo, seed)
    experts = demo.expert_jobs()
    for v in self.variants_for(seed):
      if v.trains:
        experts += demo.expert_jobs(v.name, v.overrides, self._embedding_dir(demo, v),
                                    self._sources(v))
    # One process per owner trains all of that owner's variants (its own data only).
    jobs = [j for d in DOMAINS for j in self._batch(
        demo, [j for j in experts if j[1].startswith(f"expert_{d}")], f"experts_{d}")]
    if "unrestricted" in self.baselines and not self._trained(demo, "unrestricted"):
      jobs.append((demo.train_args("unrestricted", demo.work / "unrestricted"), "unrestricted"))
    if jobs:
      demo.step(f"training {len(experts)} experts (every variant, one process per owner)"
                + (" and the unrestricted MoE" if any(l == "unrestricted" for _, l in jobs) else ""))
      demo.run_parallel(jobs)
    stitches = [j for j in [demo.stitch_job()] + [demo.stitch_job(v.name)
                                                   for v in self.variants_for(seed) if v.trains]
                if j]
    if stitches:
      demo.step(f"stitching public + experts ({len(stitches)} models: default and variants)")
      demo.run_parallel(self._batch(demo, stitches, "stitches"))
    # Router tuning (proxies first) and BTX, both from the stitched default model.
    jobs = [] if demo.router_tuned() else [demo.router_job()]
    if "btx" in self.baselines and not self._trained(demo, "btx"):
      jobs.append((demo.train_args("btx", demo.work / "btx",
                                   f"--config.init.params={demo.merged_dir()}"), "btx"))
    if jobs:
      demo.step("router tuning on public data + proxies sampled from each owner's model"
                + (", BTX (the stitched model fine-tuned on all data)" if jobs[-1][1] == "btx"
                   else ""))
      if not demo.router_tuned():
        demo.run_parallel(demo.proxy_jobs())
      demo.run_parallel(jobs)
    self._evaluate(demo)
    self._baselines(demo)

  def _batch(self, demo, jobs: list, name: str) -> list:
    """Jobs of one party as one `experiments.batch` process (start-up paid once)."""
    if len(jobs) <= 1:
      return jobs
    spec = demo.logs / f"{name}.jobs.json"
    spec.write_text(json.dumps([{"module": a[0], "args": [str(x) for x in a[1:]]}
                                for a, _ in jobs], indent=1))
    return [(["flexolmo_jax.experiments.batch", f"--jobs={spec}"], name)]

  def _trained(self, demo, name) -> bool:
    return (demo.work / name / "export" / "model_config.json").exists()

  def _embedding_dir(self, demo, v: Variant) -> pathlib.Path | None:
    return None if v.embeddings == "default" else demo.work / f"embeddings_{v.embeddings}"

  def _sources(self, v: Variant) -> dict | None:
    if v.public_mix is None:
      return None
    mix = v.public_mix
    return {d: repr([(d, 1.0)] if mix == 0 else [(d, 1.0 - mix), ("public", mix)])
            for d in DOMAINS}

  def _embeddings(self, demo, seed):
    jobs = demo.embedding_jobs()
    if any(v.embeddings == "mean" for v in self.variants_for(seed)):
      jobs += demo.embedding_jobs(demo.work / "embeddings_mean", demo.self_embedder(), "embed_mean")
    if jobs:
      demo.step("domain embeddings (each owner, its own data)")
      demo.run_parallel(jobs)
    if any(v.embeddings == "random" for v in self.variants_for(seed)):
      self._random_embeddings(demo, seed)

  def _random_embeddings(self, demo, seed):
    """Random unit router rows (the paper's random-init ablation), drawn from the seed."""
    import numpy as np
    from flexolmo_jax.storage import model_io
    from flexolmo_jax.storage.atomic import write_text_atomic
    out = demo.work / "embeddings_random"
    width = model_io.read_config(demo.work / "public" / "export").d_model
    rng = np.random.default_rng(1000 + seed)
    for name in EVAL_DOMAINS:  # drawn in a fixed order, so a resumed run draws the same
      v = rng.standard_normal(width).astype(np.float32)
      path = out / f"{name}.npy"
      if not path.exists():
        buf = io.BytesIO()
        np.save(buf, v / np.linalg.norm(v))
        write_text_atomic(path, buf.getvalue())

  def eval_jobs(self, demo) -> dict[str, tuple[pathlib.Path, dict]]:
    """{name: (checkpoint, extra EvalOptions)} of every model this seed evaluates. The
    headline models also answer the corpus's held-out downstream tasks (accuracy beside
    perplexity); `extraction` is the final model's verbatim extraction of each domain's
    training documents with every expert subset (the demo's protocol)."""
    tasks = {"tasks": [str(self.data / "tasks" / f"{d}.jsonl") for d in EVAL_DOMAINS]}
    jobs = {"public": (demo.work / "public", tasks),
            "merged": (demo.final, {"opt_out_matrix": True, "tasks_opt_out": False, **tasks}),
            "merged_untuned": (demo.merged_dir(), tasks)}
    jobs.update({f"expert_{d}": (demo.expert_dir(d), tasks) for d in DOMAINS})
    for v in self.variants_for(demo.seed):
      if v.trains:
        jobs[v.name] = (demo.merged_dir(v.name), {})
      elif v.top_k is not None:
        jobs[v.name] = (demo.final, {"top_k": v.top_k})
    for b in self.baselines:
      jobs[b] = (demo.work / b, tasks)
    docs, tokens = EXTRACTION[self.scale]
    jobs["extraction"] = (demo.final, {"opt_out_matrix": True, "perplexity": False,
                                       "extraction": dict(split="train", num_docs=docs,
                                                          prefix_len=32, gen_len=tokens,
                                                          batch_size=docs)})
    return jobs

  def _evaluate(self, demo):
    from flexolmo_jax.experiments.eval_batch import done
    data = ",".join(f"{d}={self.data / d}" for d in EVAL_DOMAINS)
    todo = []
    for name, (ckpt, extra) in self.eval_jobs(demo).items():
      out = demo.work / "eval" / name
      if not done(out, ckpt, extra.get("top_k")):
        todo.append({"out": str(out), "options": dict(
            ckpt=str(ckpt), data=data, tokenizer=str(self.data / "tokenizer.json"),
            seq_len=demo.seq_len, batch_size=8, max_batches=self.eval_batches, **extra)})
    if not todo:
      return
    demo.step(f"evaluating {len(todo)} models ({min(self.jobs, len(todo))} processes)")
    batches = [todo[i::self.jobs] for i in range(min(self.jobs, len(todo)))]
    runs = []
    for i, batch in enumerate(batches):
      spec = demo.work / "eval" / f"jobs_{i}.json"
      spec.parent.mkdir(parents=True, exist_ok=True)
      spec.write_text(json.dumps(batch, indent=1))
      runs.append((["flexolmo_jax.experiments.eval_batch", f"--jobs={spec}"], f"eval_{i}"))
    demo.run_parallel(runs)

  def _baselines(self, demo):
    """Model soup, BTM and prompt routing (functions of evaluate/baselines.py, run here as
    the demo runs them), over the same validation batches as the evaluations."""
    path = demo.work / "eval" / "baselines.json"
    if path.exists():
      return
    demo.step("baselines: model soup, BTM, prompt-based routing")
    results = demo._baselines(self.eval_batches)
    results["prompt"] = self._prompt_routing(demo)
    from flexolmo_jax.storage.atomic import write_text_atomic
    write_text_atomic(path, json.dumps(results, indent=1))

  def _prompt_routing(self, demo) -> dict:
    import itertools
    from flexolmo_jax.data import make_eval_loader
    from flexolmo_jax.evaluate import baselines
    from flexolmo_jax.storage import model_io
    if not hasattr(baselines, "train_prompt_router"):
      return {}
    tok = self.data / "tokenizer.json"
    members = {}
    for label, path in [("public", demo.work / "public" / "export")] + [
        (d, demo.expert_dir(d) / "export") for d in DOMAINS]:
      cfg = model_io.read_config(path)
      members[label] = (cfg, model_io.load_params(path, cfg))
    # The coordinator's data only: public text and each owner's sampled proxies.
    coordinator = {"public": self.data / "public"}
    coordinator.update({d: demo.proxies / f"proxy_{d}" for d in DOMAINS})
    router = baselines.train_prompt_router(*members["public"], coordinator,
                                           min(32, demo.seq_len // 2), tokenizer=tok,
                                           seq_len=demo.seq_len,
                                           max_rows=64 if self.scale == "tiny" else 512)
    out = {}
    for d in EVAL_DOMAINS:
      loader = itertools.islice(make_eval_loader(str(self.data / d), str(tok), demo.seq_len,
                                                 8, 0, 1), self.eval_batches)
      out[d] = baselines.prompt_routing_scores(router, members, loader)["loss"]
    return out

  # --- the whole suite ---------------------------------------------------------------------

  def run(self):
    self.demo(0, tag="").build_data()  # the corpus, once for every seed
    for seed in range(self.seeds):
      self.run_seed(seed)
    from flexolmo_jax.experiments import suite_report
    print(f"[{time.time() - self.t0:6.0f}s] report", flush=True)
    text = suite_report.write(self)
    print(text)


def _main(argv) -> int:
  del argv
  ablations = parse_ablations(_ABLATIONS.value)
  shares = None
  if _MIX_SHARES.value is not None:
    try:
      shares = tuple(float(x) for x in cli.parse_names(_MIX_SHARES.value))
    except ValueError:
      shares = ()
    if not shares or not all(0.0 <= x < 1.0 for x in shares):
      raise app.UsageError(f"--public_mix_shares {_MIX_SHARES.value!r}: comma-separated "
                           "shares in [0, 1)")
  Suite(pathlib.Path(_WORKDIR.value).absolute(), _SEEDS.value, _SCALE.value, _JOBS.value,
        ablations, _ABLATION_SEEDS.value, shares).run()
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
