"""Proxy data for router tuning, sampled from an owner's model instead of read from its data
(the library; the command is `python -m flexolmo_jax.proxy_data`, data/proxy_data_cli.py).

The coordinator never sees the owners' data, but it holds each owner's 2-expert model (it
left the owner to be stitched): sampling from it gives text in that domain's style with no
document changing hands.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile

import numpy as np


def sample_documents(model_dir, tokenizer_path: str, samples: int, max_new_tokens: int,
                     temperature: float, top_p: float, seed: int,
                     exclude: tuple[str, ...] = ("public",)) -> list[str]:
  """Decoded sample texts (one or more documents per sample, split at EOS).

  exclude: experts opted out while sampling. By default the public expert: from a document
  boundary the 2-expert model's router leans on the public expert, and sampling then drifts
  into public-style text; the owner's expert alone writes in its domain's style.
  """
  from tokenizers import Tokenizer

  from flexolmo_jax.storage import model_io
  from flexolmo_jax.inference.generate import Sampling, generate, inference_dispatch

  tok = Tokenizer.from_file(str(tokenizer_path))
  cfg = model_io.read_config(model_dir)
  cfg = dataclasses.replace(cfg, dispatch=inference_dispatch(cfg))
  params = model_io.load_params(model_dir, cfg)
  s = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
               stop_at_eos=False, vocab_limit=tok.get_vocab_size())
  # An unknown name is an error (expert_mask names it); a dense model has nothing to opt out.
  exclude = list(exclude) if cfg.is_moe else []
  ids = generate(params, cfg, [[cfg.eos_token_id]] * samples, s, exclude=exclude, seed=seed)
  docs = []
  for row in ids:
    row = np.asarray(row[1:])  # drop the EOS prompt
    cuts = np.flatnonzero(row == cfg.eos_token_id)
    for piece in np.split(row, cuts):
      piece = piece[piece != cfg.eos_token_id]
      text = tok.decode(piece.tolist()) if piece.size else ""
      if text.strip():
        docs.append(text)
  if not docs:
    raise ValueError(f"{model_dir}: sampling produced no text (every sample was EOS)")
  return docs


def write_dataset(docs: list[str], name: str, out_dir, validation_fraction: float = 0.05) -> str:
  """docs -> DATA_DIR/NAME/1.0.0 via the normal prepare path (atomic, verified)."""
  from flexolmo_jax.data import prepare
  with tempfile.TemporaryDirectory() as tmp:
    src = pathlib.Path(tmp) / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return prepare.prepare_dataset(name, [str(src)], str(out_dir),
                                   validation_fraction=validation_fraction, overwrite=True)
