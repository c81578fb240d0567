"""Storage: every model directory is a genuine orbax checkpoint, however it was made.

Training exports, stitched, pruned and HF-imported directories are restored with plain orbax
calls only (no project code in the restore) and must equal `model_io.load_params` bit for bit.
"""
import json
import pathlib
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flexolmo_jax.convert import hf_mapping
from flexolmo_jax.convert.from_hf import from_hf
from flexolmo_jax.convert.safetensors_io import save_shard
from flexolmo_jax.stitch import StitchError, prune, stitch
from flexolmo_jax.storage import atomic, model_io
from flexolmo_jax.storage.param_store import ParamReader, ParamWriter, chunk_shape, tree_leaves
from model_utils import random_params, tiny_config
from test_stitch import _expert_from

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A training export (public), a stitched model, a pruned one and an HF import of it."""
  root = tmp_path_factory.mktemp("storage")
  pub_cfg = tiny_config(num_experts=0, top_k=1)
  pub = jax.device_get(random_params(pub_cfg, 0))
  model_io.save_model_dir(root / "export", pub, pub_cfg)
  experts = []
  for i, (name, bias) in enumerate([("math", (-0.5, -0.1)), ("code", (0.0, 0.0))]):
    p, cfg = _expert_from(pub, pub_cfg, name, 30 + i, bias)
    model_io.save_model_dir(root / name, p, cfg)
    experts.append((name, root / name))
  stitched = stitch(root / "export", experts, root / "stitched", progress=False)
  pruned = prune(stitched, ["code"], root / "pruned", progress=False)
  # An HF folder written without torch: the stitched tensors, two shards, transformers' config.
  cfg = model_io.read_config(stitched)
  hf = hf_mapping.params_to_hf(jax.device_get(model_io.load_params(stitched)), cfg)
  hf_dir = root / "hf"
  hf_dir.mkdir()
  keys = sorted(hf)
  halves = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in halves.items():
    save_shard(hf_dir / name, {k: np.asarray(hf[k]) for k in ks})
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
  (hf_dir / "config.json").write_text(json.dumps(hf_mapping.hf_config(cfg, "float32")))
  imported = from_hf(hf_dir, root / "imported", progress=False)
  return {"export": root / "export", "stitched": stitched, "pruned": pruned,
          "imported": imported}


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_bitwise(got, want):
  got, want = _flat(got), _flat(want)
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k


@pytest.mark.parametrize("kind", ["export", "stitched", "pruned", "imported"])
def test_plain_orbax_restores_every_model_dir(dirs, kind):
  d = pathlib.Path(dirs[kind])
  want = jax.device_get(model_io.load_params(d))
  # No arguments at all: orbax reads its own metadata (numpy leaves, or jax.Arrays for exports).
  _assert_bitwise(ocp.PyTreeCheckpointer().restore(d / "params"), want)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), want)
  _assert_bitwise(ocp.StandardCheckpointer().restore(d / "params", abstract), want)


def test_written_and_exported_chunks_share_one_grid(dirs):
  """One layer (and expert) per chunk everywhere, so stitched chunks line up with exports'."""
  for kind in ("export", "stitched"):
    cfg = model_io.read_config(dirs[kind])
    reader = ParamReader(dirs[kind], moe=cfg.is_moe)
    for p in reader.paths:
      shape, dt = reader.shape_dtype(p)
      stored = tuple(reader.array(p).chunk_layout.read_chunk.shape)
      assert stored == chunk_shape(p, shape, dt.itemsize, cfg.is_moe), (kind, p)


def test_producer_error_propagates_and_leaves_no_checkpoint(tmp_path):
  leaves = {("a", "w"): ((4, 8), np.float32), ("b",): ((3,), np.int32)}
  out = tmp_path / "m"

  def fill():
    writer.write(("a", "w"), (slice(0, 4), slice(0, 8)), np.ones((4, 8), np.float32))
    raise StitchError("shared tensor a.w of expert x differs from a.w of the public model")

  with pytest.raises(StitchError, match=r"^shared tensor a\.w of expert x differs"):
    with atomic.staged_directory(out, error=StitchError) as tmp:
      writer = ParamWriter(tmp / "params", leaves, moe=False)
      writer.save(fill)
  assert not out.exists() and not (tmp_path / ".m.partial").exists()
  assert not (tmp_path / ".m.lock").exists()
  # The same writer contract, completed: a checkpoint orbax restores as numpy arrays.
  with atomic.staged_directory(out, error=StitchError) as tmp:
    writer = ParamWriter(tmp / "params", leaves, moe=False)
    got = writer.save(lambda: [writer.write(p, idx, np.full(_shape(idx), 7, dt))
                               for p, (s, dt) in leaves.items() for idx in writer.pieces(p)])
  assert len(got) == 2
  tree = ocp.PyTreeCheckpointer().restore(out / "params")
  assert isinstance(tree["b"], np.ndarray) and tree["b"].tolist() == [7, 7, 7]
  assert tree["a"]["w"].dtype == np.float32 and (tree["a"]["w"] == 7).all()


def _shape(idx):
  return tuple(s.stop - s.start for s in idx)


def test_stager_refuses_existing_and_cleans_a_killed_leftover(tmp_path):
  target = tmp_path / "t"
  leftover = tmp_path / ".t.partial"
  leftover.mkdir()
  (leftover / "junk").write_text("x")  # what a SIGKILLed run leaves behind
  with atomic.staged_directory(target) as stage:
    assert pathlib.Path(stage) == leftover and not (stage / "junk").exists()
    (stage / "f").write_text("1")
  assert (target / "f").read_text() == "1" and not leftover.exists()

  class MyError(Exception):
    pass

  with pytest.raises(MyError, match="already exists"):
    with atomic.staged_directory(target, error=MyError):
      pass
  with atomic.staged_directory(target, overwrite=True) as stage:
    (stage / "g").write_text("2")
  assert sorted(f.name for f in target.iterdir()) == [atomic.SEAL, "g"]  # the seal comes last


def test_no_private_orbax_imports_and_no_torch_in_core():
  src = subprocess.run(["grep", "-rn", "_src", str(ROOT / "flexolmo_jax")], capture_output=True,
                       text=True).stdout
  assert "orbax" not in src, src
  code = ("import sys, flexolmo_jax.stitch.writer, flexolmo_jax.convert.to_hf, "
          "flexolmo_jax.convert.from_hf; assert 'torch' not in sys.modules")
  subprocess.run(["python", "-c", code], check=True, cwd=ROOT)
