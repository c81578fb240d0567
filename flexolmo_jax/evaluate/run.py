"""evaluate(): load a model onto a mesh, then perplexity, multiple choice and verbatim
extraction per expert subset."""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax

from flexolmo_jax.inference.load import load_model
from flexolmo_jax.storage.sources import resolve_model_dir
from flexolmo_jax.storage import model_io
from flexolmo_jax.data import load_tokenizer, tokenizer_info
from flexolmo_jax.evaluate import extraction as extraction_lib
from flexolmo_jax.evaluate import multiple_choice, perplexity, steps
from flexolmo_jax.evaluate.subsets import subsets_for
from flexolmo_jax.parallel import DEFAULT_RULES, make_mesh, param_shardings
from flexolmo_jax.parallel.sharding import rules_from_config


@dataclasses.dataclass
class EvalOptions:
  ckpt: str
  data: str | None = None  # see perplexity.discover_domains
  tasks: Sequence[str] = ()  # JSONL files
  tokenizer: str | None = None
  exclude: Sequence[str] = ()
  opt_out_matrix: bool = False
  seq_len: int | None = None  # default: the model's max_seq_len
  batch_size: int = 8  # global
  split: str = "validation"
  max_batches: int | None = None  # per domain (quick looks)
  mesh: dict | None = None  # config.mesh (axis -> size)
  axis_rules: Sequence | None = None  # config.axis_rules (default: DEFAULT_RULES)
  dispatch: str | None = None  # override the model's MoE dispatch (e.g. dropless)
  param_dtype: str | None = None  # e.g. bfloat16: cast weights on load (half the memory)
  top_k: int | None = None  # override the model's experts per token (an inference ablation)
  routing: bool = True
  perplexity: bool = True  # False: only tasks / extraction on the --data domains
  # False: the tasks score only the first row (e.g. all experts), not every opt-out row; each
  # row costs one forward per (example, choice), more than the perplexity of a small corpus.
  tasks_opt_out: bool = True
  extraction: extraction_lib.ExtractionOptions | None = None  # None: no extraction


def evaluate(opts: EvalOptions, devices=None, log=print) -> dict:
  """Returns the results dict that report.write_all writes (see the module docs)."""
  t0 = time.time()
  mesh = make_mesh(opts.mesh or {"fsdp": -1}, devices)
  rules = rules_from_config(opts.axis_rules) if opts.axis_rules else DEFAULT_RULES
  path = resolve_model_dir(opts.ckpt)
  cfg = model_io.read_config(path)
  subsets = subsets_for(cfg, list(opts.exclude), opts.opt_out_matrix)  # check names first
  domains = perplexity.discover_domains(opts.data) if opts.data else {}
  tok_path = opts.tokenizer or (perplexity.default_tokenizer(opts.data) if opts.data else None)
  if domains and not tok_path:
    raise ValueError("perplexity needs the tokenizer the data was prepared with: --tokenizer")
  tokenizer = load_tokenizer(tok_path) if tok_path else None
  if tok_path:
    info = tokenizer_info(tok_path)
    if info.vocab_size > cfg.vocab_size:
      raise ValueError(f"tokenizer {tok_path} has {info.vocab_size} tokens; the model's "
                       f"vocabulary is {cfg.vocab_size}")
  tasks = [multiple_choice.load_task(t, tokenizer, cfg.eos_token_id, cfg.vocab_size)
           for t in opts.tasks]
  if opts.extraction and not domains:
    raise ValueError("extraction reads the training documents of --data: pass --data")
  if not (domains and (opts.perplexity or opts.extraction)) and not tasks:
    raise ValueError("nothing to evaluate: pass --data and/or --tasks")
  # Documents are read (and bad splits reported) before the model is loaded.
  docs = {d: extraction_lib.sample_documents(p, tok_path, cfg.eos_token_id, opts.extraction)
          for d, p in domains.items()} if opts.extraction else {}

  if opts.top_k is not None and not (cfg.is_moe and 1 <= opts.top_k <= cfg.num_experts):
    raise ValueError(f"top_k {opts.top_k} needs an MoE with at least that many experts; "
                     f"{path} has {cfg.num_experts}")
  cfg, params = load_model(path, mesh, rules, dispatch=opts.dispatch,
                           param_dtype=opts.param_dtype, top_k=opts.top_k)
  p_sh = param_shardings(cfg, mesh, rules)
  B = opts.batch_size
  seq_len = opts.seq_len or cfg.max_seq_len
  log(f"model {path}: {cfg.num_experts} experts {list(cfg.names) if cfg.is_moe else ''}; "
      f"rows: {[s.name for s in subsets]}")
  rows = {s.name: {"exclude": list(s.exclude), "perplexity": {}, "tasks": {}, "extraction": {}}
          for s in subsets}
  with jax.set_mesh(mesh):
    if domains and opts.perplexity:
      step = steps.jit_step(steps.make_loss_fn(cfg, rules, routing=opts.routing), p_sh, mesh,
                            rules, B, seq_len)
      ppl = perplexity.evaluate_domains(step, params, cfg, domains, tok_path, seq_len, B,
                                        subsets, steps.batch_shardings(mesh, rules, B, seq_len),
                                        opts.split, opts.max_batches)
      for name, res in ppl.items():
        rows[name]["perplexity"] = res
    if tasks:
      T = multiple_choice.window(tasks, opts.seq_len or cfg.max_seq_len)
      step = steps.jit_step(steps.make_score_fn(cfg, rules), p_sh, mesh, rules, B, T)
      masks = {s.name: s.mask(cfg, B) for s in (subsets if opts.tasks_opt_out else subsets[:1])}
      for task in tasks:
        res = multiple_choice.score_task(step, params, task, T, B, cfg.pad_token_id, masks,
                                         steps.batch_shardings(mesh, rules, B, T))
        for name, r in res.items():
          rows[name]["tasks"][task.name] = r
    if docs:
      rates = extraction_lib.extraction_rates(params, cfg, docs, subsets, opts.extraction,
                                              vocab_limit=info.vocab_size, log=log)
      for name, res in rates.items():
        rows[name]["extraction"] = res
  return {
      "model": {"path": str(path), "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                "experts": list(cfg.names) if cfg.is_moe else [], "dispatch": cfg.dispatch},
      "split": opts.split, "seq_len": seq_len, "batch_size": B,
      "domains": list(domains) if opts.perplexity else [], "tasks": [t.name for t in tasks],
      "extraction": ({**dataclasses.asdict(opts.extraction), "domains": list(docs)}
                     if docs else None),
      "rows": rows,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "seconds": time.time() - t0,
  }
