"""Export a model directory / workdir / stitched model to a transformers folder, streaming.

One HF tensor (or, for the embedding and lm_head, one block of rows) is read and mapped at a
time; each safetensors shard is written with the `safetensors` library once its tensors are
gathered, so host memory is one shard (--max-shard-size) plus a few pieces. Experts can be left out (--exclude): HF
FlexOlmo has no run-time mask, so opt-out there means removing the expert's FFN and router row.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from typing import Sequence

import numpy as np
from etils import epath

from flexolmo_jax.storage import model_io
from flexolmo_jax.convert import hf_mapping
from flexolmo_jax.convert.safetensors_io import save_shard
from flexolmo_jax.model.expert_mask import UnknownExpertError
from flexolmo_jax.storage.atomic import staged_directory
from flexolmo_jax.storage.param_store import CHUNK_BYTES, ParamReader, ordered_map
from flexolmo_jax.storage.paths import as_path

INDEX_FILE = "model.safetensors.index.json"
# Tokenizer (and generation) files carried between HF folders and model directories.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json")
ROW_BLOCKED = (("embed_tokens",), ("lm_head",))


class ConvertError(ValueError):
  """A refusal of the converters (names the file / tensor / flag)."""


def parse_size(s) -> int:
  if isinstance(s, int):
    return s
  s = str(s).strip().upper()
  for suffix, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9),
                       ("MB", 10**6), ("KB", 10**3), ("B", 1)):
    if s.endswith(suffix):
      return int(float(s[:-len(suffix)]) * mult)
  return int(s)


def transpose(x: np.ndarray) -> np.ndarray:
  """Swap the last two axes into a new C-contiguous array, as hf_mapping._t does, but copying
  32-row blocks of bit patterns (cache-friendly): ~4x faster than numpy's strided x.T copy."""
  if x.ndim != 2 or x.dtype.itemsize not in (1, 2, 4, 8):
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))
  bits = x.view(np.dtype(f"u{x.dtype.itemsize}"))
  m, n = x.shape
  out = np.empty((n, m), bits.dtype)
  for i in range(0, m, 32):
    out[:, i:i + 32] = bits[i:i + 32].T
  return out.view(x.dtype)


def np_dtype(name: str) -> np.dtype:
  import ml_dtypes
  table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
  if name not in table:
    raise ConvertError(f"--dtype={name!r}: expected one of {sorted(table)}")
  return np.dtype(table[name])


def row_blocks(m: hf_mapping.TensorMap, hf_shape, itemsize: int, stored_rows: int | None = None):
  """Row blocks of the HF tensor streamed as separate pieces (None: the whole tensor).

  stored_rows: the source's chunk extent along those rows, so each block reads whole chunks.
  """
  if m.per_layer or m.path not in ROW_BLOCKED:
    return [None]
  rows = max(1, CHUNK_BYTES // (itemsize * math.prod(hf_shape[1:])))
  if stored_rows and stored_rows < hf_shape[0]:
    rows = stored_rows
  return [slice(r, min(r + rows, hf_shape[0])) for r in range(0, hf_shape[0], rows)]


def ours_block_index(m: hf_mapping.TensorMap, index: tuple, block: slice | None) -> tuple:
  """Our index of HF rows `block` (embed [V, d]: rows; lm_head [d, V]: columns)."""
  if block is None:
    return index
  return index + ((slice(None), block) if m.path == ("lm_head",) else (block,))


class ShardArena:
  """One buffer, reused for every shard, that the shard's tensors are gathered into.

  `safetensors.numpy.save_file` writes a shard straight from its arrays' memory (no copy), so
  peak host memory is one shard, and the same pages serve every shard: fresh multi-hundred-MB
  allocations per shard were slower than writing (page faults into memory the VM had already
  returned) and the allocator kept two shards' worth alive.
  """

  def __init__(self, nbytes: int):
    self._buf = np.empty(max(int(nbytes), 1), np.uint8)
    self._offset = 0
    self.tensors: dict[str, np.ndarray] = {}

  def tensor(self, key: str, shape, dtype) -> np.ndarray:
    """The shard's array for `key` (laid out on first use; 64-byte aligned)."""
    if key not in self.tensors:
      dtype = np.dtype(dtype)
      n = math.prod(shape) * dtype.itemsize
      start = -(-self._offset // 64) * 64
      if start + n > self._buf.size:
        raise ConvertError(f"{key}: shard arena of {self._buf.size} bytes overflows")
      self.tensors[key] = self._buf[start:start + n].view(dtype).reshape(shape)
      self._offset = start + n
    return self.tensors[key]

  def put(self, key: str, piece: np.ndarray, block: slice | None, shape) -> None:
    """`piece` is the whole HF tensor, or rows `block` of it."""
    dst = self.tensor(key, shape, piece.dtype)
    if block is None:
      dst[...] = piece.reshape(dst.shape)
    else:
      dst[block] = piece

  def clear(self) -> None:
    self.tensors, self._offset = {}, 0


def _write_shard(arena: ShardArena, path: epath.Path) -> None:
  save_shard(path, arena.tensors)
  arena.clear()


def _find_tokenizer(model_dir: epath.Path, depth: int = 0) -> epath.Path | None:
  """Tokenizer files this model is known to use: carried ones, else the training data's."""
  tok = model_dir / model_io.TOKENIZER_DIR
  if tok.is_dir():
    return tok
  meta = model_io.read_meta(model_dir)
  if model_dir.name == "export":  # a training workdir: its checkpoints record the data
    ckpts = model_dir.parent / "checkpoints"
    steps = sorted((p for p in ckpts.glob("*") if p.name.isdigit()), key=lambda p: int(p.name)) \
        if ckpts.is_dir() else []
    for step in reversed(steps):
      for f in (step / "meta").glob("*"):
        try:
          t = json.loads(f.read_text()).get("data", {}).get("tokenizer")
        except (ValueError, AttributeError, OSError):
          continue
        if t and as_path(t).is_file():
          return as_path(t)
  if depth < 2:  # a stitched or pruned model: ask the public model / the source
    for rec in (meta.get("public"), meta.get("from")):
      if isinstance(rec, dict) and rec.get("model_dir"):
        found = _find_tokenizer(as_path(rec["model_dir"]), depth + 1)
        if found:
          return found
  return None


def copy_tokenizer(src: epath.Path, dest: epath.Path, cfg) -> list[str]:
  """Copy tokenizer files (a folder, or a lone tokenizer.json plus a generated config)."""
  copied = []
  if src.is_dir():
    for name in TOKENIZER_FILES:
      if (src / name).is_file():
        (src / name).copy(dest / name, overwrite=True)
        copied.append(name)
  elif src.is_file():
    src.copy(dest / "tokenizer.json", overwrite=True)
    copied.append("tokenizer.json")
  if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
    import tokenizers  # a lone tokenizer.json (this project's data tokenizer): describe it
    tok = tokenizers.Tokenizer.from_str((dest / "tokenizer.json").read_text())
    conf = {"tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
            "eos_token": tok.id_to_token(cfg.eos_token_id),
            "pad_token": tok.id_to_token(cfg.pad_token_id)}
    if cfg.bos_token_id is not None:
      conf["bos_token"] = tok.id_to_token(cfg.bos_token_id)
    (dest / "tokenizer_config.json").write_text(json.dumps(conf, indent=1))
    copied.append("tokenizer_config.json")
  return copied


def to_hf(ckpt, out, *, exclude: Sequence[str] = (), dtype: str | None = None,
          drop_bias: bool = False, max_shard_size="256MiB", tokenizer=None,
          overwrite: bool = False, workers: int = 2, progress: bool = True) -> epath.Path:
  """Write `ckpt` (model dir / workdir / stitched model) as a transformers folder at `out`.

  exclude: expert names to remove. dtype: "float32" | "bfloat16" | None (as stored).
  drop_bias: export a model whose learned expert bias is active, without the bias (routing,
  hence logits, will differ); otherwise such a model is refused.
  """
  from tqdm import tqdm
  from flexolmo_jax.storage.sources import resolve
  src = resolve(ckpt, "checkpoint")
  cfg = src.cfg
  exclude = list(dict.fromkeys(exclude))
  names = list(cfg.names) if cfg.is_moe else []
  unknown = [n for n in exclude if n not in names]
  if unknown:
    raise UnknownExpertError(f"unknown expert name(s) {unknown} in --exclude; this model's "
                             f"experts are {names}" if cfg.is_moe else
                             f"--exclude {unknown}: {src.given} is a dense model with no experts")
  keep = [i for i in range(cfg.num_experts) if names[i] not in exclude] if cfg.is_moe else []
  if cfg.is_moe and not keep:
    raise ConvertError(f"--exclude={','.join(exclude)} leaves no expert")
  reader = ParamReader(src.model_dir, f"checkpoint {src.describe()}", moe=cfg.is_moe)

  out_cfg = cfg
  if cfg.is_moe:
    out_cfg = cfg.replace(num_experts=len(keep), expert_names=tuple(names[i] for i in keep),
                          top_k=min(cfg.top_k, len(keep)), expert_bias=False)
  if cfg.expert_bias:
    bias_path = ("decoder", "layers", "mlp", "router_bias") if cfg.scan_layers else None
    if bias_path is None:
      raise ConvertError(f"{src.describe()}: unscanned models with an expert bias are not supported")
    b = reader.read(bias_path).astype(np.float32)
    biased = [i for i in keep if i > 0]  # slot 0 (public) never gets the bias
    active = [names[i] for i in biased if np.any(np.minimum(b[:, i], 0) != 0)]
    if active and not drop_bias:
      raise ConvertError(
          f"{src.describe()} was trained with a learned expert bias (min(b, 0) < 0 for "
          f"{active}); transformers' FlexOlmo has no such parameter, so this model cannot be "
          f"exported exactly. Pass --drop-bias to export it without the bias (routing and "
          f"logits will differ), or stitch without --keep-bias.")
    if active:
      logging.warning("dropping the learned expert bias of %s: the exported model routes "
                      "differently from this checkpoint", active)

  # Plan: every on-disk HF tensor, its source slice, its dtype; then shards by size.
  out_np_dtype = None if dtype in (None, "auto") else np_dtype(dtype)
  entries = []
  for key, m, l, e in hf_mapping.iter_slices(out_cfg):
    src_e = keep[e] if e is not None else None
    path, index = hf_mapping.param_location(cfg, m, l, src_e)
    if not reader.has(path):
      raise ConvertError(f"{src.describe()}: tensor {'.'.join(path)} is missing")
    stored = reader.shape_dtype(path)[1]
    dt = out_np_dtype or stored
    shape = hf_mapping.expected_shape(out_cfg, m)
    entries.append((key, m, path, index, shape, dt))
  limit = parse_size(max_shard_size)
  shards, cur, cur_bytes = [], [], 0
  for ent in entries:
    n = math.prod(ent[4]) * ent[5].itemsize
    if cur and cur_bytes + n > limit:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(ent)
    cur_bytes += n
  if cur:
    shards.append(cur)
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

  def units():
    for si, shard in enumerate(shards):
      for key, m, path, index, shape, dt in shard:
        src_itemsize = reader.shape_dtype(path)[1].itemsize
        stored = None
        if m.path in ROW_BLOCKED:  # HF rows are axis 0 of embed_tokens, axis 1 of lm_head
          stored = reader.array(path).chunk_layout.read_chunk.shape[m.path == ("lm_head",)]
        for block in row_blocks(m, shape, src_itemsize, stored):
          yield si, key, m, path, index, block, dt

  def work(u):
    si, key, m, path, index, block, dt = u
    arr = reader.read(path, ours_block_index(m, index, block))
    if m.path == ("mlp", "router") and cfg.is_moe:
      arr = arr[keep]
    piece = transpose(arr) if m.to_hf is hf_mapping._t else m.to_hf(arr)
    return si, key, path, block, piece.astype(dt, copy=False)

  total = sum(math.prod(e[4]) * e[5].itemsize for e in entries)
  weight_map = {}
  hf_shapes = {e[0]: tuple(e[4]) for e in entries}
  # One arena holds the shard being gathered (the largest shard: a tensor bigger than
  # max_shard_size is a shard of its own), reused for every shard: peak memory is one shard.
  arena = ShardArena(max(sum(math.prod(e[4]) * e[5].itemsize + 64 for e in sh) for sh in shards)
                     if shards else 0)
  with staged_directory(out, overwrite, error=ConvertError) as tmp:
    cur = None  # index of the shard being gathered into `arena`

    def flush():
      if cur is not None:
        _write_shard(arena, tmp / files[cur])

    last_path = None
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="to_hf",
              disable=not progress, file=sys.stderr, mininterval=0.5) as bar:
      for si, key, path, block, piece in ordered_map(work, units(), workers):
        if si != cur:  # shards are produced in order: write the previous one
          flush()
          cur = si
        arena.put(key, piece, block, hf_shapes[key])
        weight_map[key] = files[si]
        if last_path is not None and path != last_path:
          reader.release(last_path)
        last_path = path
        bar.update(piece.nbytes)
      flush()
    dtype_name = str(entries[0][5]) if entries else "float32"
    (tmp / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=1))
    tok = as_path(tokenizer) if tokenizer else _find_tokenizer(src.model_dir)
    if tok is not None:
      copied = copy_tokenizer(tok, tmp, out_cfg)
      logging.info("tokenizer files from %s: %s", tok, copied)
    else:
      logging.info("no tokenizer known for %s; pass --tokenizer=PATH to include one", src.given)
    hf_cfg = hf_mapping.hf_config(out_cfg, dtype_name)
    # Written last: a folder is loadable only once config.json exists (and it is renamed
    # into place atomically anyway).
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=1))
  return as_path(out)
