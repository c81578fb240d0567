"""Streaming stitch (public model + N experts -> (N+1)-expert model) and prune (drop experts).

Both are one pass over the *output* chunks (param_store: one layer [x one expert] x at most
CHUNK_BYTES of rows). For each chunk a resolver names where its value comes from and which
other tensors must be bit-identical to it; workers read, compare and write, and the main thread
hashes the pieces in order. At most `workers + 1` chunks are in flight, so host memory is a few
chunks whatever the number of experts or layers. Everything is written into `.OUT.partial` and
moved into place and sealed at the end (storage.atomic): a refusal or a crash never leaves an output that looks finished.
The params are a genuine orbax checkpoint: orbax runs the save, the stream fills its arrays.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from flexolmo_jax.storage import model_io
from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.expert_mask import UnknownExpertError
from flexolmo_jax.model.params import abstract_params
from flexolmo_jax.storage.atomic import staged_directory
from flexolmo_jax.storage.paths import copy_tree
from flexolmo_jax.storage.param_store import (EXPERT_LEAVES, ParamReader, ParamWriter, chunk_grid,
                                              describe_index, lead_axes, leaf_name, ordered_map,
                                              tree_leaves)
from flexolmo_jax.storage.sources import Source, resolve
from flexolmo_jax.stitch.verify import (StitchError, bitwise_equal, check_configs, check_names,
                                        first_difference, max_abs_difference, within_tolerance)

DEFAULT_TOP_K = 4  # the paper's inference setting (top-4 of 8); capped at the expert count
FORMAT = "flexolmo_jax.stitch/1"
HASH_NOTE = ("sha256 of the raw little-endian bytes of each shared tensor, and per expert slot "
             "of x[:, slot] (all layers) of each expert tensor, taken chunk by chunk (C order "
             "within a chunk, chunks in C order of the grid `chunks`): for tensors chunked in "
             "whole rows -- all but very large layer slices and lm_head -- that is "
             "sha256(x.tobytes()). slot_sha256 is the sha256 of the lines 'tensor:hexdigest\\n' "
             "of that slot in sorted tensor order. `python -m flexolmo_jax.stitch --verify=DIR` "
             "recomputes them all")
SHARED_CHECKS_NOTE = (
    "stitched with --shared-tolerance > 0: per checked tensor (shared tensors; `T[:, 0]` = the "
    "public half of expert tensor T), the max absolute difference of each source's copy from "
    "the copy `used` (the public model's; for the public router row, the first expert's), over "
    "all layers; every one is <= shared_tolerance and finite")
DELAY_ENV = "FLEXOLMO_STITCH_PIECE_DELAY"  # test hook: seconds to sleep per piece (kill tests)

Path = tuple


@dataclasses.dataclass(frozen=True)
class Ref:
  """Where a piece comes from: a slice of a source tensor, or zeros (reader None)."""
  reader: ParamReader | None
  who: str
  path: Path
  index: tuple
  name: str = ""  # the source's name in manifest.json ("public" or the expert's)


@dataclasses.dataclass(frozen=True)
class Check:
  ref: Ref
  what: str  # how a mismatch is described ("shared tensor", "public half", ...)
  tensor: str = ""  # its key in the manifest's tolerance report ("lm_head", "...[:, 0]")


Resolver = Callable[[Path, tuple], tuple[Ref, list[Check]]]


def _is_expert_leaf(path: Path) -> bool:
  return len(path) > 1 and path[-2] == "mlp" and path[-1] in EXPERT_LEAVES


def _read(ref: Ref, shape, dtype) -> np.ndarray:
  if ref.reader is None:
    return np.zeros(shape, dtype)
  v = ref.reader.read(ref.path, ref.index)
  if v.size != math.prod(shape):
    raise StitchError(f"{ref.who}: {leaf_name(ref.path)}{describe_index(ref.index)} has shape "
                      f"{v.shape}, expected {tuple(shape)} elements")
  return v.reshape(shape)


def _raw(ref: Ref):
  return None if ref.reader is None else ref.reader.raw_chunk(ref.path, ref.index)


def _piece_shape(index) -> tuple[int, ...]:
  return tuple(s.stop - s.start for s in index)


def _refusal(check: Check, value_ref: Ref, other, value, tolerance: float) -> str:
  how = ""
  if other.shape == value.shape and other.dtype == value.dtype:  # else first_difference says
    worst, finite = max_abs_difference(other, value)
    how = f"max |difference| {worst:.6g}{'' if finite else ' (non-finite values)'}, "
  limit = f"{tolerance:g}" if tolerance else "0 (bitwise)"
  return (f"{check.what} {leaf_name(check.ref.path)}{describe_index(check.ref.index)} of "
          f"{check.ref.who} differs from {leaf_name(value_ref.path)}"
          f"{describe_index(value_ref.index)} of {value_ref.who}: {how}above "
          f"--shared-tolerance={limit}; {first_difference(other, value)}")


def stream(writer: ParamWriter, order: Sequence[Path], resolver: Resolver, *, workers: int = 2,
           progress: bool = True, desc: str = "stitch", tolerance: float = 0.0,
           checked: dict | None = None) -> dict[tuple[Path, int | None], str]:
  """Fill every chunk of `writer` in `order`; returns sha256 per (tensor, expert slot|None).

  tolerance > 0: a checked piece may differ from the value's by max |difference| <= tolerance
  (finite values only); the value's copy is written. checked: filled (main thread) with
  {check.tensor: {"used": source, "max_abs_diff": {source: max over its pieces}}}.
  """
  from tqdm import tqdm

  delay = float(os.environ.get(DELAY_ENV, "0") or 0)
  units = ((leaf, idx) for leaf in order for idx in writer.pieces(leaf))
  total = sum(math.prod(writer.leaves[p][0]) * writer.leaves[p][1].itemsize for p in order)

  def work(unit):
    leaf, idx = unit
    shape, dtype = _piece_shape(idx), writer.leaves[leaf][1]
    value_ref, checks = resolver(leaf, idx)
    value = _read(value_ref, shape, dtype)
    raw = _raw(value_ref) if checks else None
    diffs = []
    for check in checks:
      worst = 0.0
      if raw is None or _raw(check.ref) != raw:  # equal stored bytes + codec: identical values
        other = _read(check.ref, shape, dtype)
        if not tolerance:  # today's rule exactly: bit patterns (NaN == NaN, 0.0 != -0.0)
          if not bitwise_equal(value, other):
            raise StitchError(_refusal(check, value_ref, other, value, tolerance))
        else:
          ok, worst = within_tolerance(other, value, tolerance)
          if not ok:
            raise StitchError(_refusal(check, value_ref, other, value, tolerance))
      diffs.append((check.tensor, value_ref.name, check.ref.name, worst))
    writer.write(leaf, idx, value)
    if delay:
      time.sleep(delay)
    used = {(r.reader, r.path) for r in [value_ref] + [c.ref for c in checks] if r.reader}
    return leaf, idx, value, used, diffs

  hashers: dict[tuple[Path, int | None], "hashlib._Hash"] = {}
  current, used_by_leaf = None, set()
  with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
            disable=not progress, file=sys.stderr, mininterval=0.5) as bar:
    for leaf, idx, value, used, diffs in ordered_map(work, units, workers):
      for tensor, used_name, src, worst in diffs if checked is not None else ():
        rec = checked.setdefault(tensor, {"used": used_name, "max_abs_diff": {}})
        rec["max_abs_diff"][src] = max(rec["max_abs_diff"].get(src, 0.0), worst)
      if leaf != current:
        # Every piece of the previous tensor is done: drop its handles (and any chunk cache).
        for reader, path in used_by_leaf:
          reader.release(path)
        if current is not None:
          writer.release(current)
        current, used_by_leaf = leaf, set()
      used_by_leaf |= used
      slot = idx[1].start if lead_axes(leaf, writer.moe) == 2 else None
      h = hashers.setdefault((leaf, slot), hashlib.sha256())
      h.update(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
      bar.update(value.nbytes)
  for reader, path in used_by_leaf:
    reader.release(path)
  return {k: h.hexdigest() for k, h in hashers.items()}


# --- pre-flight: every source holds exactly the tensors its config implies -----------------

def _stored_leaves(src: Source, reader: ParamReader) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  expected = tree_leaves(abstract_params(src.cfg))
  missing = [leaf_name(p) for p in expected if not reader.has(p)]
  extra = [leaf_name(p) for p in reader.paths if p not in expected]
  if missing or extra:
    raise StitchError(f"{src.describe()}: stored tensors do not match its model config: "
                      f"missing {missing[:4]}, unexpected {extra[:4]}")
  out = {}
  for p, (shape, _) in expected.items():
    got_shape, got_dtype = reader.shape_dtype(p)
    reader.release(p)  # reopened when streamed: hold no handles for the whole run
    if got_shape != shape:
      raise StitchError(f"{src.describe()}: tensor {leaf_name(p)} has shape {got_shape}, its "
                        f"model config implies {shape}")
    out[p] = (got_shape, got_dtype)
  return out


def _same_dtype(path: Path, pairs: list[tuple[Source, np.dtype]]) -> np.dtype:
  first_src, first = pairs[0]
  for src, dt in pairs[1:]:
    if dt != first:
      raise StitchError(f"tensor {leaf_name(path)} is stored as {dt} in {src.describe()} but as "
                        f"{first} in {first_src.describe()}; all sources must share a dtype")
  return first


def _bias_active(src: Source, reader: ParamReader) -> bool:
  if not src.cfg.expert_bias:
    return False
  b = reader.read(("decoder", "layers", "mlp", "router_bias"))
  return bool(np.any(np.minimum(b[:, 1:], 0) != 0))


# --- outputs ---------------------------------------------------------------------------------

def _slot_digest(per_tensor: dict[str, str]) -> str:
  lines = "".join(f"{k}:{v}\n" for k, v in sorted(per_tensor.items()))
  return hashlib.sha256(lines.encode()).hexdigest()


def _hash_tables(hashes, num_experts):
  shared = {leaf_name(p): h for (p, slot), h in hashes.items() if slot is None}
  slots = [{} for _ in range(num_experts)]
  for (p, slot), h in hashes.items():
    if slot is not None:
      slots[slot][leaf_name(p)] = h
  return shared, slots


def _chunks(writer: ParamWriter) -> dict[str, list[int]]:
  return {leaf_name(p): list(c) for p, c in sorted(writer.chunks.items())}


def _copy_tokenizer(sources: Sequence[Source], dest) -> None:
  for s in sources:
    tok = s.model_dir / model_io.TOKENIZER_DIR
    if tok.is_dir():
      copy_tree(tok, dest / model_io.TOKENIZER_DIR)
      return


def _finish_dir(tmp, cfg: ModelConfig, meta: dict, manifest: dict) -> None:
  (tmp / model_io.META_FILE).write_text(json.dumps(meta, indent=1, default=str))
  (tmp / model_io.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
  # Written last: a directory is a model directory only once its config exists.
  (tmp / model_io.CONFIG_FILE).write_text(model_io.config_json(cfg))


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _workers(workers):
  return workers or min(2, os.cpu_count() or 1)


# --- stitch ----------------------------------------------------------------------------------

def merged_dispatch(num_experts: int, top_k: int) -> str:
  """The merged model's dispatch, for its own size (the 2-expert sources run `dense`).

  dense when every expert sees every token; otherwise dropless: exact, expert-parallel on a
  mesh with an expert axis, and on CPU a tiled grouped matmul costing ~top_k/E of dense.
  """
  return "dense" if top_k == num_experts else "dropless"


def stitch(public, experts: Sequence[tuple[str, object]], out, *, top_k: int | None = None,
           keep_bias: bool = False, drop: Sequence[str] = (), overwrite: bool = False,
           workers: int | None = None, progress: bool = True,
           shared_tolerance: float = 0.0) -> os.PathLike:
  """Merge the public model and expert checkpoints [(name, path)] into OUT; returns OUT.

  Slot 0 = the public FFN + public router row, slot i = expert i's trained FFN + router row.
  keep_bias: keep each expert's learned bias (slot i <- its slot 1; slot 0 = 0); by default it
  is dropped, as the reference merge does. drop: names in `experts` to leave out.
  shared_tolerance: 0 = shared tensors and public halves must be bit-identical to the public
  model's; ATOL > 0 = max |difference| <= ATOL (finite values) is accepted, e.g. bf16 noise of
  released experts, and the public model's copy is written (the first expert's for the public
  router row, which the dense public model lacks); manifest.json records each max difference.
  """
  tol = float(shared_tolerance or 0.0)
  if not math.isfinite(tol) or tol < 0:
    raise StitchError(f"--shared-tolerance={shared_tolerance!r} must be a finite number >= 0")
  names = [str(n) for n, _ in experts]
  check_names(names)
  unknown = [d for d in drop if d not in names]
  if unknown:
    raise UnknownExpertError(f"unknown expert name(s) {unknown} in --drop; the experts are {names}")
  experts = [(n, p) for n, p in experts if n not in drop]
  names = [n for n, _ in experts]
  if not experts:
    raise StitchError("every expert was dropped; nothing to stitch")
  pub = resolve(public, "public")
  exps = [resolve(p, n) for n, p in experts]
  check_configs(pub, exps)
  E = len(exps) + 1
  k = top_k or min(DEFAULT_TOP_K, E)
  if not 1 <= k <= E:
    raise StitchError(f"--top-k={k} must be in [1, {E}] for {E} experts")
  out_cfg = pub.cfg.replace(num_experts=E, top_k=k, expert_names=("public",) + tuple(names),
                            expert_bias=keep_bias, norm_topk_prob=exps[0].cfg.norm_topk_prob,
                            dispatch=merged_dispatch(E, k))

  pub_r = ParamReader(pub.model_dir, f"the public model {pub.describe()}", moe=False)
  exp_r = [ParamReader(s.model_dir, f"expert {s.describe()}", moe=True) for s in exps]
  pub_leaves = _stored_leaves(pub, pub_r)
  exp_leaves = [_stored_leaves(s, r) for s, r in zip(exps, exp_r)]

  out_shapes = tree_leaves(abstract_params(out_cfg))
  leaves = {}
  for p, (shape, _) in out_shapes.items():
    if not _is_expert_leaf(p):  # shared: public's dtype, every expert must agree
      pairs = [(pub, pub_leaves[p][1])] + [(s, l[p][1]) for s, l in zip(exps, exp_leaves)]
    elif p[-1] in ("gate_proj", "up_proj", "down_proj"):
      pairs = [(pub, pub_leaves[p][1])] + [(s, l[p][1]) for s, l in zip(exps, exp_leaves)]
    else:  # router rows / bias exist only in the experts
      pairs = [(s, l[p][1]) for s, l in zip(exps, exp_leaves) if p in l]
      pairs = pairs or [(pub, np.dtype(out_cfg.param_dtype))]
    leaves[p] = (shape, _same_dtype(p, pairs))

  active = [s.name for s, r in zip(exps, exp_r) if _bias_active(s, r)]
  if active and not keep_bias:
    logging.warning("dropping the learned expert bias of %s (as the reference merge does): the "
                    "stitched model routes these experts without it; pass --keep-bias to keep it",
                    active)

  pub_who = f"the public model {pub.describe()}"
  exp_who = [f"expert {s.describe()}" for s in exps]
  exp_src = list(zip(exp_r, exp_who, names))

  def resolver(leaf: Path, idx: tuple):
    if not _is_expert_leaf(leaf):
      value = Ref(pub_r, pub_who, leaf, idx, "public")
      return value, [Check(Ref(r, w, leaf, idx, n), "shared tensor", leaf_name(leaf))
                     for r, w, n in exp_src]
    layer, slot, rest = idx[0], idx[1].start, idx[2:]
    name = leaf[-1]
    if slot == 0:
      if name == "router_bias":
        return Ref(None, "zeros", leaf, idx), []
      half = (layer, slice(0, 1)) + rest
      key = f"{leaf_name(leaf)}[:, 0]"
      if name == "router":  # the dense public model has no router: the experts must agree
        return Ref(exp_r[0], exp_who[0], leaf, half, names[0]), [
            Check(Ref(r, w, leaf, half, n), "public router row", key) for r, w, n in exp_src[1:]]
      return Ref(pub_r, pub_who, leaf, (layer,) + rest, "public"), [
          Check(Ref(r, w, leaf, half, n), "public half", key) for r, w, n in exp_src]
    src, r, w = exps[slot - 1], exp_r[slot - 1], exp_who[slot - 1]
    if name == "router_bias" and not src.cfg.expert_bias:
      return Ref(None, "zeros", leaf, idx), []
    return Ref(r, w, leaf, (layer, slice(1, 2)) + rest), []

  shared_order = [p for p in out_shapes if not _is_expert_leaf(p)]
  expert_order = [p for n in EXPERT_LEAVES for p in out_shapes if _is_expert_leaf(p) and p[-1] == n]
  with staged_directory(out, overwrite, error=StitchError) as tmp:
    writer = ParamWriter(tmp / model_io.PARAMS_DIR, leaves, moe=True)
    checked: dict = {}
    # orbax saves the tree; `stream` fills it from inside that save (see ParamWriter.save).
    hashes = writer.save(lambda: stream(writer, shared_order + expert_order, resolver,
                                        workers=_workers(workers), progress=progress,
                                        desc="stitch", tolerance=tol, checked=checked))
    shared, slots = _hash_tables(hashes, E)
    records = [{"slot": 0, "name": "public", "source": pub.record(),
                "router_row_from": exps[0].record()}]
    for i, s in enumerate(exps, start=1):
      records.append({"slot": i, "name": s.name, "source": s.record(),
                      "bias": ("kept" if keep_bias else "dropped") if s.cfg.expert_bias else "none",
                      "bias_active": s.name in active})
    for rec, sl in zip(records, slots):
      rec["sha256"] = sl
      rec["slot_sha256"] = _slot_digest(sl)
    manifest = {"format": FORMAT, "created": _now(), "expert_names": list(out_cfg.names),
                "top_k": k, "keep_bias": keep_bias, "hash": HASH_NOTE, "public": pub.record(),
                "shared_sha256": shared, "experts": records, "chunks": _chunks(writer),
                "shared_tolerance": tol or 0}
    if tol:  # at 0 every check was bitwise: nothing to report beyond the hashes
      manifest["shared_checks"] = {
          "note": SHARED_CHECKS_NOTE,
          "tensors": {t: {"used": r["used"],
                          "max_abs_diff": dict(sorted(r["max_abs_diff"].items()))}
                      for t, r in sorted(checked.items())}}
    meta = {"stage": "stitched", "public": pub.record(), "experts": [s.record() for s in exps],
            "keep_bias": keep_bias}
    _copy_tokenizer([pub] + exps, tmp)
    _finish_dir(tmp, out_cfg, meta, manifest)
  return out


# --- prune -----------------------------------------------------------------------------------

def prune(model, drop: Sequence[str], out, *, overwrite: bool = False,
          workers: int | None = None, progress: bool = True) -> os.PathLike:
  """Physically remove experts `drop` (their FFNs and router rows) from a stitched model."""
  src = resolve(model, "model")
  cfg = src.cfg
  if not cfg.is_moe:
    raise StitchError(f"{src.describe()} is a dense model; there are no experts to drop")
  if not cfg.scan_layers:
    raise StitchError(f"{src.describe()} uses unscanned layers; cannot prune it")
  names = list(cfg.names)
  drop = list(dict.fromkeys(drop))
  unknown = [d for d in drop if d not in names]
  if unknown:
    raise UnknownExpertError(f"unknown expert name(s) {unknown}; this model's experts are {names}")
  if not drop:
    raise StitchError("nothing to drop (--drop=NAME)")
  keep = [i for i, n in enumerate(names) if n not in drop]
  if not keep:
    raise StitchError(f"dropping {drop} leaves no expert")
  if 0 not in keep and cfg.expert_bias:
    raise StitchError(f"cannot drop slot 0 ({names[0]!r}) of a model with a learned expert bias: "
                      f"slot 0 is the one expert the bias never applies to. Exclude it at run "
                      f"time instead (load(..., exclude=[{names[0]!r}]))")
  out_cfg = cfg.replace(num_experts=len(keep), expert_names=tuple(names[i] for i in keep),
                        top_k=min(cfg.top_k, len(keep)))
  reader = ParamReader(src.model_dir, f"model {src.describe()}", moe=True)
  stored = _stored_leaves(src, reader)
  out_shapes = tree_leaves(abstract_params(out_cfg))
  leaves = {p: (shape, stored[p][1]) for p, (shape, _) in out_shapes.items()}
  who = f"model {src.describe()}"

  def resolver(leaf: Path, idx: tuple):
    if _is_expert_leaf(leaf):
      j = keep[idx[1].start]
      idx = (idx[0], slice(j, j + 1)) + idx[2:]
    return Ref(reader, who, leaf, idx), []

  old = json.loads((src.model_dir / model_io.MANIFEST_FILE).read_text()) \
      if (src.model_dir / model_io.MANIFEST_FILE).is_file() else {}
  old_records = {r.get("name"): r for r in old.get("experts", [])}
  with staged_directory(out, overwrite, error=StitchError) as tmp:
    writer = ParamWriter(tmp / model_io.PARAMS_DIR, leaves, moe=True)
    hashes = writer.save(lambda: stream(writer, list(out_shapes), resolver,
                                        workers=_workers(workers), progress=progress,
                                        desc="prune"))
    shared, slots = _hash_tables(hashes, len(keep))
    records = []
    for j, i in enumerate(keep):
      rec = {k: v for k, v in old_records.get(names[i], {}).items()
             if k not in ("slot", "sha256", "slot_sha256")}
      rec.update(slot=j, name=names[i], sha256=slots[j], slot_sha256=_slot_digest(slots[j]))
      records.append(rec)
    manifest = {"format": FORMAT, "created": _now(), "expert_names": list(out_cfg.names),
                "top_k": out_cfg.top_k, "keep_bias": cfg.expert_bias, "hash": HASH_NOTE,
                "public": old.get("public"), "pruned_from": src.record(), "dropped": drop,
                "shared_tolerance": old.get("shared_tolerance"),  # of the stitch it came from
                "shared_sha256": shared, "experts": records, "chunks": _chunks(writer)}
    meta = {"stage": "pruned", "from": src.record(), "dropped": drop}
    _copy_tokenizer([src], tmp)
    _finish_dir(tmp, out_cfg, meta, manifest)
  return out


# --- verify ----------------------------------------------------------------------------------

def verify(model, *, progress: bool = True) -> dict:
  """Recompute every sha256 of MODEL/manifest.json from the stored arrays (streaming).

  Returns the manifest; raises StitchError naming the first tensor / expert slot whose bytes
  differ from what the stitcher wrote (a flipped bit, a swapped file, a partial copy).
  """
  from tqdm import tqdm
  src = resolve(model, "model")
  man_file = src.model_dir / model_io.MANIFEST_FILE
  if not man_file.is_file():
    raise StitchError(f"{src.given} has no {model_io.MANIFEST_FILE} (not a stitched model)")
  man = json.loads(man_file.read_text())
  want = {(n, None): h for n, h in man.get("shared_sha256", {}).items()}
  names = {}
  for rec in man.get("experts", []):
    names[rec["slot"]] = rec["name"]
    for n, h in rec.get("sha256", {}).items():
      want[(n, rec["slot"])] = h
  moe = src.cfg.is_moe
  reader = ParamReader(src.model_dir, f"model {src.describe()}", moe=moe)
  chunks = man.get("chunks", {})
  got: dict = {}
  total = sum(math.prod(reader.shape_dtype(p)[0]) * reader.shape_dtype(p)[1].itemsize
              for p in reader.paths)
  with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
            disable=not progress, file=sys.stderr, mininterval=0.5) as bar:
    for path in sorted(reader.paths):
      shape, dt = reader.shape_dtype(path)
      grid = chunks.get(leaf_name(path)) or reader.array(path).chunk_layout.read_chunk.shape
      by_slot = lead_axes(path, moe) == 2
      for idx in chunk_grid(shape, grid):
        v = reader.read(path, idx)
        key = (leaf_name(path), idx[1].start if by_slot else None)
        got.setdefault(key, hashlib.sha256()).update(
            np.ascontiguousarray(v).view(np.uint8).reshape(-1).data)
        bar.update(v.nbytes)
      reader.release(path)
  for key in sorted(set(want) | set(got), key=lambda k: (k[0], -1 if k[1] is None else k[1])):
    tensor, slot = key
    where = tensor if slot is None else f"{tensor}[:, {slot}] (expert {names.get(slot)!r})"
    if key not in got:
      raise StitchError(f"{src.given}: manifest lists {where}, which is not stored")
    if key not in want:
      raise StitchError(f"{src.given}: {where} is stored but not in the manifest")
    if got[key].hexdigest() != want[key]:
      raise StitchError(f"{src.given}: {where} does not match manifest.json (sha256 "
                        f"{got[key].hexdigest()[:16]}..., manifest {want[key][:16]}...)")
  return man
