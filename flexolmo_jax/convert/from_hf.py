"""Import a transformers FlexOlmo or OLMo-2 folder (safetensors) into a model directory.

Streams one shard file at a time, one tensor (or one block of embedding rows) at a time, into
the per-layer chunks of a new model directory; checks every key and shape against config.json
before writing anything. An OLMo-2 import is a dense model: a public model that starts from
real weights (`init.params` of the public stage, or `--public` of the stitcher).
"""
from __future__ import annotations

import json
import logging
import math
import sys

from etils import epath

from flexolmo_jax.storage import model_io
from flexolmo_jax.convert import hf_mapping
from flexolmo_jax.convert.safetensors_io import Reader, SafetensorsError
from flexolmo_jax.convert.to_hf import (INDEX_FILE, TOKENIZER_FILES, ConvertError, np_dtype,
                                        ours_block_index, transpose)
from flexolmo_jax.model.params import abstract_params
from flexolmo_jax.storage.atomic import staged_directory
from flexolmo_jax.storage.param_store import ParamWriter, ordered_map, tree_leaves
from flexolmo_jax.storage.paths import as_path

FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers' in-memory layout


def _shard_files(hf_dir: epath.Path) -> list[epath.Path]:
  index = hf_dir / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not (hf_dir / f).is_file()]
    if missing:
      raise ConvertError(f"{hf_dir}: shard files listed in {INDEX_FILE} are missing: {missing}")
    return [hf_dir / f for f in files]
  single = hf_dir / "model.safetensors"
  if single.is_file():
    return [single]
  if list(hf_dir.glob("*.bin")):
    raise ConvertError(f"{hf_dir} holds PyTorch .bin weights; only safetensors are read "
                       f"(re-save with save_pretrained(..., safe_serialization=True))")
  raise ConvertError(f"{hf_dir}: no model.safetensors or {INDEX_FILE}")


def _locate(cfg, where: dict[str, Reader]):
  """(hf key to read, reader, fused expert/part or None) for every tensor the config needs."""
  I = cfg.ffn_hidden
  plan, used, missing = [], set(), []
  for key, m, l, e in hf_mapping.iter_slices(cfg):
    if key in where:
      plan.append((key, m, l, e, key, None))
      used.add(key)
      continue
    if e is not None:  # transformers' fused in-memory layout, saved as is
      proj = key.rsplit(".", 2)[-2]
      fused = (f"model.layers.{l}.mlp.experts.down_proj" if proj == "down_proj"
               else f"model.layers.{l}.mlp.experts.gate_up_proj")
      if fused in where:
        rows = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I), "down_proj": None}[proj]
        plan.append((key, m, l, e, fused, (e, rows)))
        used.add(fused)
        continue
    missing.append(key)
  unexpected = [k for k in where if k not in used and not k.endswith("rotary_emb.inv_freq")]
  if missing or unexpected:
    raise hf_mapping.MappingError(
        f"the safetensors files do not match config.json: missing {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''}")
  return plan


def from_hf(hf_dir, out, *, param_dtype: str | None = None, dtype: str | None = None,
            overwrite: bool = False, workers: int = 2, progress: bool = True) -> epath.Path:
  """Write the model directory `out` from the transformers folder `hf_dir`.

  param_dtype: storage dtype of the params (default: as stored in the HF files).
  dtype: compute dtype recorded in the model config (default bfloat16).
  """
  from tqdm import tqdm
  hf_dir = as_path(hf_dir)
  conf_file = hf_dir / "config.json"
  if not conf_file.is_file():
    raise ConvertError(f"{hf_dir}: no config.json (not a transformers model folder)")
  hf = json.loads(conf_file.read_text())
  try:
    readers = [Reader(f) for f in _shard_files(hf_dir)]
  except SafetensorsError as e:
    raise ConvertError(str(e)) from e
  where = {}
  for r in readers:
    for k in r.keys():
      where[k] = r
  cfg0 = hf_mapping.model_config_from_hf(hf)
  stored = where["model.embed_tokens.weight"].dtype("model.embed_tokens.weight") \
      if "model.embed_tokens.weight" in where else None
  pdt = np_dtype(param_dtype) if param_dtype else stored
  if pdt is None:
    raise hf_mapping.MappingError(f"{hf_dir}: no model.embed_tokens.weight in the safetensors files")
  cfg = cfg0.replace(scan_layers=True, param_dtype=str(pdt), dtype=dtype or cfg0.dtype)
  plan = _locate(cfg, where)
  for key, m, l, e, file_key, fused in plan:  # every shape, before writing anything
    shape = where[file_key].shape(file_key)
    want = hf_mapping.expected_shape(cfg, m)
    if fused is not None:
      proj_rows = 2 * cfg.ffn_hidden if fused[1] is not None else cfg.d_model
      want = (cfg.num_experts, proj_rows, want[1])
    if shape != tuple(want):
      raise hf_mapping.MappingError(f"{where[file_key].path.name}: {file_key} has shape {shape}, "
                                    f"config.json implies {tuple(want)}")

  leaves = {p: (s, pdt) for p, (s, _) in tree_leaves(abstract_params(cfg)).items()}
  order = {r.path: i for i, r in enumerate(readers)}
  position = {(r.path, k): i for r in readers for i, k in enumerate(r.keys())}

  def units():
    # One shard file at a time, tensors in the order the file lists them.
    ranked = sorted(plan, key=lambda p: (order[where[p[4]].path],
                                         position[where[p[4]].path, p[4]], p[3] or 0))
    for key, m, l, e, file_key, fused in ranked:
      path, index = hf_mapping.param_location(cfg, m, l, e)
      if fused is None and not m.per_layer and m.path in (("embed_tokens",), ("lm_head",)):
        # Blocks of rows that match the output chunks exactly (no read-modify-write).
        axis = 1 if m.path == ("lm_head",) else 0
        rows = writer.chunks[path][axis]
        n = where[file_key].shape(file_key)[0]
        for r in range(0, n, rows):
          yield key, m, path, index, file_key, None, slice(r, min(r + rows, n))
      else:
        yield key, m, path, index, file_key, fused, None

  def work(u):
    key, m, path, index, file_key, fused, block = u
    r = where[file_key]
    try:
      if fused is not None:
        e, rows = fused
        arr = r.read(file_key, slice(e, e + 1))[0]
        arr = arr if rows is None else arr[rows]
      else:
        arr = r.read(file_key, block)
    except SafetensorsError as ex:
      raise ConvertError(str(ex)) from ex
    piece = (transpose(arr) if m.to_ours is hf_mapping._t else m.to_ours(arr)).astype(pdt, copy=False)
    writer.write(path, ours_block_index(m, index, block), piece)
    return piece.nbytes

  total = sum(r.dtype(k).itemsize * math.prod(r.shape(k)) for k, r in where.items())

  def fill():  # runs inside orbax's save of the new params (ParamWriter.save)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="from_hf",
              disable=not progress, file=sys.stderr, mininterval=0.5) as bar:
      for n in ordered_map(work, units(), workers):
        bar.update(n)

  with staged_directory(out, overwrite, error=ConvertError) as tmp:
    writer = ParamWriter(tmp / model_io.PARAMS_DIR, leaves, moe=cfg.is_moe)
    writer.save(fill)
    carried = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    if carried:
      (tmp / model_io.TOKENIZER_DIR).mkdir()
      for n in carried:
        (hf_dir / n).copy(tmp / model_io.TOKENIZER_DIR / n)
    meta = {"stage": "imported", "from": str(hf_dir), "model_type": hf.get("model_type"),
            "architectures": hf.get("architectures"), "tokenizer_files": carried}
    (tmp / model_io.META_FILE).write_text(json.dumps(meta, indent=1))
    (tmp / model_io.CONFIG_FILE).write_text(model_io.config_json(cfg))
  logging.info("imported %s (%s) -> %s", hf_dir, hf.get("model_type"), out)
  return as_path(out)
