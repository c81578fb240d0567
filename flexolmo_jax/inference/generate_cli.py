r"""Batched text generation with a KV cache and a per-example expert mask.

  python -m flexolmo_jax.generate --ckpt=DIR --prompt="def add(a, b):" [--prompt=...]
      [--prompts_file=F.jsonl] [--exclude=math,code] [--max_new_tokens=64]
      [--temperature=0 --top_p=1.0 --seed=0] [--tokenizer=tokenizer.json] [--out=F.jsonl]

Prompts are left-padded into one batch (padding slots are invisible to attention, positions
start at 0 for every prompt), prefilled in one pass, then decoded one token per step inside a
single compiled loop. temperature 0 is greedy; otherwise softmax(logits / temperature)
restricted to the top-p nucleus. Each example has its own expert mask: a JSONL prompts file
line {"prompt": "...", "exclude": ["math"]} opts that example out of the math expert, so one
batch serves users with different data permissions. --exclude applies to lines without one.

Sharded over all devices by default (the runtime config's mesh, fsdp=-1): params restored
straight into their shardings, the batch and KV cache split over data/fsdp, KV heads over
tensor. Choose the mesh as the other tools do, e.g. --config.mesh.fsdp=2 --config.mesh.tensor=4.
"""
from __future__ import annotations

import json
import os

from absl import flags
from etils import epath

from flexolmo_jax import cli
from flexolmo_jax.inference.generate import Sampling, generate, inference_dispatch

FLAGS = flags.FlagValues()
_CONFIG = cli.define_runtime_config(FLAGS)
_CKPT = flags.DEFINE_string("ckpt", None, "Model directory or training workdir.", flag_values=FLAGS)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt; repeat for a batch.",
                                    flag_values=FLAGS)
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, ".jsonl ({prompt, exclude}) or one "
                                    "prompt per line.", flag_values=FLAGS)
_EXCLUDE = flags.DEFINE_string("exclude", "", "Experts opted out (examples without their own).",
                               flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: CKPT/tokenizer.json).",
                                 flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.", flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.", flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_NO_STOP = flags.DEFINE_bool("no_stop", False, "Do not stop at EOS.", flag_values=FLAGS)
_LOAD = cli.ModelLoadFlags(FLAGS)
_OUT = flags.DEFINE_string("out", None, "Write JSONL results here.", flag_values=FLAGS)
_DIST = cli.DistributedFlags(FLAGS)
flags.mark_flag_as_required("ckpt", flag_values=FLAGS)


def _read_prompts() -> list[dict]:
  items = [{"prompt": p} for p in _PROMPT.value or []]
  if _PROMPTS_FILE.value:
    with epath.Path(_PROMPTS_FILE.value).expanduser().open("r") as f:  # local or gs://
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        if _PROMPTS_FILE.value.endswith(".jsonl"):
          try:
            item = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{_PROMPTS_FILE.value}:{n}: not JSON ({e})") from None
          if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f'{_PROMPTS_FILE.value}:{n}: expected {{"prompt": "...", '
                             f'"exclude": [...]}}')
          items.append(item)
        else:
          items.append({"prompt": line.rstrip("\n")})
  if not items:
    raise ValueError("no prompts: pass --prompt and/or --prompts_file")
  return items


def _main(argv) -> int:
  del argv
  _DIST.init()
  from flexolmo_jax.inference.load import load_model
  from flexolmo_jax.storage.atomic import write_text_atomic
  from flexolmo_jax.storage.sources import resolve_model_dir
  from flexolmo_jax.data import load_tokenizer, tokenizer_info
  from flexolmo_jax.model import expert_mask
  from flexolmo_jax.model.expert_mask import UnknownExpertError
  from flexolmo_jax.storage.model_io import read_config
  path = resolve_model_dir(_CKPT.value)
  tok_path = _TOKENIZER.value or os.fspath(path / "tokenizer.json")
  if not epath.Path(tok_path).expanduser().is_file():
    raise ValueError(f"no tokenizer: pass --tokenizer (looked for {tok_path})")
  tokenizer, info = load_tokenizer(tok_path), tokenizer_info(tok_path)
  items = _read_prompts()
  default_exclude = cli.parse_names(_EXCLUDE.value)
  cfg = read_config(path)
  excludes = [list(it.get("exclude", default_exclude)) for it in items]
  for ex in excludes:  # unknown names fail before any weights are read
    if cfg.is_moe:
      expert_mask(cfg.names, ex)
    elif ex:
      raise UnknownExpertError(f"this is a dense model (no experts); cannot exclude {ex}")
  s = Sampling(_MAX_NEW.value, _TEMPERATURE.value, _TOP_P.value, not _NO_STOP.value,
               vocab_limit=info.vocab_size)
  mesh, rules = cli.mesh_and_rules(_CONFIG.value)
  cfg, params = load_model(path, mesh, rules, dispatch=_LOAD.dispatch.value or inference_dispatch(cfg),
                           param_dtype=_LOAD.param_dtype.value)
  prompts = [tokenizer.encode(it["prompt"], add_special_tokens=False).ids for it in items]
  outs = generate(params, cfg, prompts, s, excludes if cfg.is_moe else (), _SEED.value,
                  mesh=mesh, rules=rules)
  records = []
  for it, ex, toks in zip(items, excludes, outs):
    text = tokenizer.decode([t for t in toks if t != cfg.eos_token_id])
    records.append({"prompt": it["prompt"], "exclude": ex, "completion": text, "tokens": toks})
    print(f"--- [{', '.join('-' + e for e in ex) or 'all experts'}] {it['prompt']!r}")
    print(it["prompt"] + text)
  if _OUT.value:
    write_text_atomic(_OUT.value, "".join(json.dumps(r) + "\n" for r in records))
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
