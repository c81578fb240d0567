"""FlexOlmo lifecycle on the embedded FlexMix-mini corpus (the demo's configs).

Argument: "STAGE[,DOMAIN][,SIZE][,norouter]" with STAGE public | expert | router | btx |
unrestricted, DOMAIN one of the corpus domains (code, math, legal) for the expert stage, SIZE
small (default; d_model 384 so the offline all-MiniLM-L6-v2 embedder serves) or tiny (tests).

  python -m flexolmo_jax.build_flexmix_mini --out=$D
  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:public --workdir=$W/public \
      --config.data.root=$D
  python -m flexolmo_jax.router_init --data=$D/public --out=$W/public.npy
  python -m flexolmo_jax.router_init --data=$D/math --out=$W/math.npy
  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:expert,math --workdir=$W/math \
      --config.data.root=$D --config.init.public=$W/public/export \
      --config.init.public_embedding=$W/public.npy --config.init.domain_embedding=$W/math.npy
  # ... one expert per domain, then the coordinator:
  python -m flexolmo_jax.stitch --public=$W/public --expert=code=$W/code --expert=math=$W/math \
      --expert=legal=$W/legal --out=$W/merged --top-k=2
  python -m flexolmo_jax.proxy_data --model=$W/math --name=proxy_math --out=$D \
      --tokenizer=$D/tokenizer.json   # and proxy_code, proxy_legal
  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:router --workdir=$W/router \
      --config.data.root=$D --config.init.params=$W/merged

Baselines of the paper (same architecture as the merged model, 4 experts, top-2):
  # BTX (Branch-Train-MiX): the stitched model, every parameter fine-tuned on ALL the data
  # (public + every owner's): the data-sharing upper bound FlexOlmo gives up.
  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:btx --workdir=$W/btx \
      --config.data.root=$D --config.init.params=$W/merged
  # Unrestricted MoE: random init, every parameter, all data mixed, for as many steps as
  # give the lifecycle's training FLOPs (public + 3 experts + router tuning; `,norouter`:
  # without router tuning); see `lifecycle_configs` and experiments/flop_budget.py.
  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:unrestricted \
      --workdir=$W/unrestricted --config.data.root=$D
"""
import os

import ml_collections

from flexolmo_jax import config_base as cb

DOMAINS = ("code", "math", "legal")
STAGES = ("public", "expert", "router", "btx", "unrestricted")
BASELINES = ("btx", "unrestricted")
PUBLIC_MIX = 0.25  # share of public data in each owner's expert training
SIZES = {
    "small": dict(d_model=384, n_layers=3, n_heads=6, n_kv_heads=6, ffn_hidden=1024),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128),
}


def default_root():
  base = os.environ.get("FLEXOLMO_DATA_DIR") or os.path.expanduser("~/.cache/flexolmo_jax")
  return os.path.join(base, "flexmix_mini")


def lifecycle_configs(size: str = "small", router_tuning: bool = True) -> dict:
  """The FlexOlmo lifecycle's training configs at `size`: {"public", "expert_<domain>" for
  every domain, "router" (with `router_tuning`)}; what the unrestricted baseline matches."""
  tail = "" if size == "small" else f",{size}"
  out = {"public": get_config(f"public{tail}")}
  out.update({f"expert_{d}": get_config(f"expert,{d}{tail}") for d in DOMAINS})
  if router_tuning:
    out["router"] = get_config(f"router{tail}")
  return out


def unrestricted_steps(size: str = "small", router_tuning: bool = True) -> int:
  """Steps of the unrestricted stage whose training FLOPs equal the lifecycle's (within half
  a step; experiments/flop_budget.py says what is counted)."""
  from flexolmo_jax.experiments import flop_budget
  budget = sum(flop_budget.lifecycle_flops(lifecycle_configs(size, router_tuning)).values())
  return flop_budget.matched_steps(budget, _stage_config("unrestricted", None, size, steps=1))


def get_config(arg=None):
  parts = (arg or "public").split(",")
  stage = parts[0]
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; stages {STAGES}")
  domain = next((p for p in parts[1:] if p in DOMAINS), None)
  size = next((p for p in parts[1:] if p in SIZES), "small")
  router_tuning = "norouter" not in parts[1:]
  unknown = [p for p in parts[1:] if p not in DOMAINS and p not in SIZES and p != "norouter"]
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown}; domains {DOMAINS}, sizes "
                     f"{tuple(SIZES)}, or norouter (unrestricted only)")
  steps = unrestricted_steps(size, router_tuning) if stage == "unrestricted" else None
  return _stage_config(stage, domain, size, steps)


def _stage_config(stage, domain, size, steps=None):
  # scan_unroll = n_layers: the layer scan fully unrolled (same parameters, same maths up to
  # float rounding). On XLA:CPU the scanned loop writes every layer's SwiGLU residuals into
  # stacked buffers with single-threaded fusions: the unrolled step is ~25-30% faster here
  # (benchmarks/bench_train.py --scan_unroll); at 3 layers it costs no compile time.
  model = dict(vocab_size=8192, max_seq_len=128, eos_token_id=0, pad_token_id=1,
               scan_unroll=SIZES[size]["n_layers"], **SIZES[size])
  if stage == "expert":
    if domain is None:
      raise ValueError(f"the expert stage needs a domain: expert,{'|'.join(DOMAINS)}")
    model.update(cb.moe_fields(("public", domain), top_k=2, expert_bias=True, dispatch="dense"))
  elif stage in ("router",) + BASELINES:  # the merged model's architecture
    model.update(cb.moe_fields(("public",) + DOMAINS, top_k=2, dispatch="capacity",
                               capacity_factor=2.0))
  config = cb.base_config(cb.model_block(**model))
  small = size == "tiny"
  # Sized so the whole demo (public model + three experts + evaluation) fits in ~20 minutes
  # on 2 CPU cores at "small"; "tiny" is for tests.
  if steps is None:  # unrestricted: given, from the lifecycle's FLOPs
    steps = {"public": 250, "expert": 150, "router": 100, "btx": 100}[stage]
    steps = 20 if small else steps
  # From random init (public, unrestricted) the public model's rate; fine-tuning every
  # parameter of a trained model (btx) a lower one.
  lr = {"public": 3e-3, "unrestricted": 3e-3, "btx": 1e-3}.get(stage, 2e-3)
  cb.add_training(config, stage, steps=steps,
                  global_batch_size=8 if small else 16, seq_len=64 if small else 128,
                  lr=lr,
                  warmup_steps=2 if small else 25, log_every=5 if small else 25)
  config.data.root = default_root()
  # Paths are resolved against data.root at run time unless absolute.
  if stage == "public":
    config.data.sources = [["public", 1.0]]
  elif stage == "expert":
    # The owner's own data plus some public data (public, so no isolation is lost). Trained
    # on D_i alone, an expert's router row only ever learns to win -- it rises on every
    # input -- and the stitched model then sends public text to the domain experts. Public
    # examples teach the row (and its negative bias) where the public expert should lead.
    config.data.sources = [[domain, 1.0 - PUBLIC_MIX], ["public", PUBLIC_MIX]]
  elif stage in BASELINES:
    # Everyone's data, mixed: what the baselines may use and FlexOlmo may not (BTX's MoE
    # fine-tuning; the unrestricted MoE). Equal weights per source.
    config.data.sources = [["public", 1.0]] + [[d, 1.0] for d in DOMAINS]
  else:
    # Router tuning sees public data and, per domain, proxy text sampled from that owner's
    # 2-expert model (python -m flexolmo_jax.proxy_data); never the owners' data itself.
    config.data.sources = [["public", 1.0]] + [[f"proxy_{d}", 1.0] for d in DOMAINS]
  config.data.tokenizer = "tokenizer.json"
  # An owner evaluates on its own data only (plus the public set); the coordinator evaluates
  # the merged model on every domain afterwards (python -m flexolmo_jax.evaluate).
  eval_domains = ("public", domain) if stage == "expert" else ("public",) + DOMAINS
  config.eval.sources = {d: d for d in eval_domains}
  config.checkpoint.every = 10 if small else 100
  return config
