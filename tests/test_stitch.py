"""Stitcher: the merge invariant, refusals, atomicity under kill -9, manifest, prune, load()."""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flexolmo_jax.storage import atomic

import flexolmo_jax
from flexolmo_jax.storage import model_io
from flexolmo_jax.model.expert_mask import UnknownExpertError
from flexolmo_jax.storage.param_store import ordered_map
from flexolmo_jax.stitch import SourceError, StitchError, prune, stitch, verify
from flexolmo_jax.stitch.__main__ import main as stitch_main
from flexolmo_jax.train.init import expert_from_public
from model_utils import random_ids, random_params, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5  # same maths, float summation order only


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(public_model, tmp_path_factory):
  """Two real tiny experts trained from the session's public model (training workdirs)."""
  from flexolmo_jax.train.trainer import train
  from test_train import expert_config
  root = tmp_path_factory.mktemp("experts")
  out = {}
  for domain in ("math", "code"):
    config = expert_config(public_model, steps=4, log_every=2, lr=3e-2)
    config.init.domain_embedding = str(public_model["embeddings"][domain])
    config.data.sources = [[domain, 1.0]]
    config.eval.sources = {}
    train(config, root / domain)
    out[domain] = root / domain
  return out


def _expert_from(pub, pub_cfg, name, seed, bias):
  cfg = pub_cfg.replace(num_experts=2, top_k=2, expert_bias=True, expert_names=("public", name))
  rng = np.random.default_rng(seed)
  r_pub = np.random.default_rng(0).normal(size=pub_cfg.d_model).astype(np.float32)
  r_dom = rng.normal(size=pub_cfg.d_model).astype(np.float32)
  p = jax.device_get(expert_from_public(pub, pub_cfg, cfg, r_pub, r_dom))
  mlp = p["decoder"]["layers"]["mlp"]
  for k in ("gate_proj", "up_proj", "down_proj"):
    mlp[k] = np.array(mlp[k])
    mlp[k][:, 1] += 0.05 * rng.normal(size=mlp[k][:, 1].shape).astype(np.float32)
  mlp["router_bias"] = np.array([[0.0, b] for b in bias], np.float32)
  return p, cfg


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  """A random public model and three expert model dirs (one with an active learned bias)."""
  root = tmp_path_factory.mktemp("synth")
  pub_cfg = tiny_config(num_experts=0, top_k=1)
  pub = jax.device_get(random_params(pub_cfg, 0))
  model_io.save_model_dir(root / "public", pub, pub_cfg, {"stage": "public", "step": 3})
  experts = {}
  for i, (name, bias) in enumerate([("math", (-0.8, -0.2)), ("code", (0.0, 0.0)),
                                    ("legal", (0.3, -1.5))]):
    p, cfg = _expert_from(pub, pub_cfg, name, 10 + i, bias)
    model_io.save_model_dir(root / name, p, cfg, {"stage": "expert", "step": 5 + i})
    experts[name] = (root / name, p, cfg)
  return {"root": root, "public": root / "public", "pub": pub, "pub_cfg": pub_cfg,
          "experts": experts}


def _experts(synth, names=("math", "code", "legal")):
  return [(n, synth["experts"][n][0]) for n in names]


def _params(path):
  return jax.device_get(model_io.load_params(path))


def _no_output(out):
  out = pathlib.Path(out)
  assert not out.exists()
  assert not (out.parent / f".{out.name}.partial").exists()


# --- the merge invariant -----------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [2, 3])
def test_invariant_trained_experts_keep_bias(trained, public_model, tmp_path, top_k):
  """Real training workdirs, stitched with --keep-bias, restricted to {public, i}: exactly
  expert i's 2-expert model, for top-2 and for a larger k (excluded experts never take a slot).
  (A few training steps leave the bias >= 0, i.e. inert; the next test covers an active one.)"""
  out = tmp_path / "stitched"
  rc = stitch_main([f"--public={public_model['dir']}", f"--expert=math={trained['math']}",
                    f"--expert=code={trained['code']}", f"--out={out}", f"--top-k={top_k}",
                    "--keep-bias", "--no-progress"])
  assert rc == 0 and model_io.is_model_dir(out)
  merged = flexolmo_jax.load(out, dtype="float32")
  assert merged.expert_names == ("public", "math", "code") and merged.config.top_k == top_k
  ids = np.asarray(random_ids(merged.config, batch=2, length=16, seed=3))
  for name, other in (("math", "code"), ("code", "math")):
    own = flexolmo_jax.load(trained[name], dtype="float32")  # a training workdir
    mlp = own.params["decoder"]["layers"]["mlp"]
    assert np.abs(np.asarray(mlp["gate_proj"][:, 1] - mlp["gate_proj"][:, 0])).max() > 0  # trained
    ours = flexolmo_jax.load(out, exclude=[other], dtype="float32").logits(ids)
    np.testing.assert_allclose(ours, own.logits(ids), atol=TOL, rtol=0)
    # Without the opt-out the other expert changes the output: the check above is not vacuous.
    assert np.abs(merged.logits(ids) - own.logits(ids)).max() > 1e-3


def test_invariant_with_active_bias_kept(synth, tmp_path):
  """--keep-bias carries each expert's learned bias into its slot: restricted to {public, i} the
  stitched model equals expert i's model *with* its (active, negative) bias."""
  out = stitch(synth["public"], _experts(synth), tmp_path / "s", top_k=2, keep_bias=True,
               progress=False)
  cfg = model_io.read_config(out)
  ids = np.asarray(random_ids(cfg, seed=2))
  for name in ("math", "code", "legal"):
    others = [n for n in cfg.names[1:] if n != name]
    got = flexolmo_jax.load(out, exclude=others).logits(ids)
    ref = flexolmo_jax.load(synth["experts"][name][0]).logits(ids)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_invariant_without_bias_matches_the_expert_with_its_bias_zeroed(synth, tmp_path):
  """Default stitch drops the learned bias (reference behaviour): restricted to {public, i} it
  equals expert i's 2-expert model with router_bias set to 0."""
  out = stitch(synth["public"], _experts(synth), tmp_path / "s", top_k=2, progress=False)
  cfg = model_io.read_config(out)
  assert not cfg.expert_bias and cfg.names == ("public", "math", "code", "legal")
  ids = np.asarray(random_ids(cfg, seed=1))
  for name in ("math", "legal"):  # both have an active bias that the stitch drops
    path, p, ecfg = synth["experts"][name]
    p = jax.tree.map(np.array, p)
    p["decoder"]["layers"]["mlp"]["router_bias"][:] = 0.0
    from flexolmo_jax.model import FlexOlmo
    ref = np.asarray(FlexOlmo(ecfg).apply({"params": p}, ids)[0])
    others = [n for n in cfg.names[1:] if n != name]
    got = flexolmo_jax.load(out, exclude=others).logits(ids)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    with_bias = flexolmo_jax.load(path).logits(ids)
    assert np.abs(with_bias - ref).max() > 1e-4  # the bias mattered: dropping it is visible


# --- manifest, layout, prune ---------------------------------------------------------------------

def test_manifest_hashes_sources_and_chunk_layout(synth, tmp_path):
  out = stitch(synth["public"], _experts(synth, ("math", "code")), tmp_path / "s",
               keep_bias=True, progress=False)
  man = json.loads((out / "manifest.json").read_text())
  params = _params(out)
  assert man["expert_names"] == ["public", "math", "code"]
  assert [e["name"] for e in man["experts"]] == man["expert_names"]
  assert man["experts"][1]["source"]["step"] == 5 and man["public"]["step"] == 3
  assert man["experts"][1]["bias"] == "kept" and man["experts"][1]["bias_active"]
  assert man["shared_tolerance"] == 0 and "shared_checks" not in man  # bitwise, as before
  flat = {".".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  sha = lambda x: hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
  for name, digest in man["shared_sha256"].items():
    assert digest == sha(flat[name]), name
  assert "embed_tokens" in man["shared_sha256"] and "lm_head" in man["shared_sha256"]
  for slot, rec in enumerate(man["experts"]):
    assert set(rec["sha256"]) >= {f"decoder.layers.mlp.{k}" for k in ("gate_proj", "up_proj",
                                                                        "down_proj", "router")}
    for name, digest in rec["sha256"].items():
      assert digest == sha(flat[name][:, slot]), (slot, name)
  # Slot contents: 0 = public FFN, i = expert i's trained slot 1; bias slot 0 = 0.
  mlp = params["decoder"]["layers"]["mlp"]
  np.testing.assert_array_equal(mlp["gate_proj"][:, 0], synth["pub"]["decoder"]["layers"]["mlp"]["gate_proj"])
  np.testing.assert_array_equal(mlp["gate_proj"][:, 2], synth["experts"]["code"][1]["decoder"]["layers"]["mlp"]["gate_proj"][:, 1])
  np.testing.assert_array_equal(mlp["router_bias"],
                                np.array([[0.0, -0.8, 0.0], [0.0, -0.2, 0.0]], np.float32))
  # Streaming layout: one layer x one expert per chunk file, no compression.
  zarray = json.loads((out / "params" / "decoder.layers.mlp.gate_proj" / ".zarray").read_text())
  assert zarray["chunks"][:2] == [1, 1] and zarray["compressor"] is None
  assert len(list((out / "params" / "decoder.layers.mlp.gate_proj").glob("*.*.*.*"))) == 2 * 3
  assert man["chunks"]["decoder.layers.mlp.gate_proj"] == zarray["chunks"]
  # --verify recomputes every hash; a flipped byte in one expert's chunk is pinned to its slot.
  assert stitch_main([f"--verify={out}", "--no-progress"]) == 0
  chunk = out / "params" / "decoder.layers.mlp.gate_proj" / "1.2.0.0"
  data = bytearray(chunk.read_bytes())
  data[100] ^= 0x01
  chunk.write_bytes(bytes(data))
  with pytest.raises(StitchError, match=r"gate_proj\[:, 2\] \(expert 'code'\) does not match"):
    verify(out, progress=False)


def test_prune_equals_runtime_opt_out_and_keeps_slot_hashes(synth, tmp_path):
  full = stitch(synth["public"], _experts(synth), tmp_path / "full", progress=False)
  assert model_io.read_config(full).top_k == 4  # default min(4, #experts)
  rc = stitch_main([f"--model={full}", "--drop=code", f"--out={tmp_path / 'pruned'}",
                    "--no-progress"])
  assert rc == 0
  pruned = flexolmo_jax.load(tmp_path / "pruned")
  assert pruned.expert_names == ("public", "math", "legal") and pruned.config.top_k == 3
  ids = np.asarray(random_ids(pruned.config, seed=4))
  np.testing.assert_allclose(pruned.logits(ids), flexolmo_jax.load(full, exclude=["code"]).logits(ids),
                             atol=TOL, rtol=0)
  before = {e["name"]: e["slot_sha256"] for e in json.loads((full / "manifest.json").read_text())["experts"]}
  after = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
  assert {e["name"]: e["slot_sha256"] for e in after["experts"]} == {
      n: before[n] for n in ("public", "math", "legal")}
  assert after["dropped"] == ["code"] and after["experts"][2]["source"]["path"].endswith("legal")
  # --drop while stitching leaves a listed expert out.
  out = stitch(synth["public"], _experts(synth), tmp_path / "nolegal", drop=["legal"], progress=False)
  assert model_io.read_config(out).names == ("public", "math", "code")
  with pytest.raises(UnknownExpertError, match="nope"):
    prune(full, ["nope"], tmp_path / "x", progress=False)
  _no_output(tmp_path / "x")


def test_stitched_dir_restores_sharded_for_the_runtime_tools(synth, tmp_path):
  """evaluate/generate restore model dirs straight into a mesh: the stitcher's layout works."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 host devices")
  from flexolmo_jax.parallel import make_mesh, param_shardings
  out = stitch(synth["public"], _experts(synth), tmp_path / "s", progress=False)
  cfg = model_io.read_config(out)
  mesh = make_mesh(dict(data=2, fsdp=2, expert=2, tensor=1))
  sharded = model_io.load_params(out, cfg, shardings=param_shardings(cfg, mesh))
  assert len(sharded["decoder"]["layers"]["mlp"]["gate_proj"].sharding.device_set) > 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), _params(out))


def test_legacy_single_chunk_checkpoints_stitch_identically(synth, tmp_path):
  """Model dirs saved with orbax defaults (one chunk per array) read the same, via a cache."""
  legacy = tmp_path / "legacy_math"
  path, p, cfg = synth["experts"]["math"]
  ocp.PyTreeCheckpointer().save(legacy / "params", p)
  shutil.copy(path / "model_config.json", legacy / "model_config.json")
  # Written by a sealing writer (its config says so) but no seal: an unfinished publish.
  with pytest.raises((StitchError, SourceError), match="incomplete model directory"):
    stitch(synth["public"], [("math", legacy)], tmp_path / "a", progress=False)
  # A directory from before seals existed (no marker, no seal) is complete as it is.
  c = json.loads((legacy / "model_config.json").read_text())
  assert c.pop(model_io.SEALED_KEY) is True
  (legacy / "model_config.json").write_text(json.dumps(c))
  assert model_io.is_model_dir(legacy) and not atomic.is_sealed(legacy)
  a = stitch(synth["public"], [("math", legacy)], tmp_path / "a", progress=False)
  b = stitch(synth["public"], [("math", path)], tmp_path / "b", progress=False)
  ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
  assert ma["shared_sha256"] == mb["shared_sha256"]
  assert [e["slot_sha256"] for e in ma["experts"]] == [e["slot_sha256"] for e in mb["experts"]]


def test_ordered_map_bounds_work_in_flight():
  live, peak = [0], [0]

  def fn(i):
    live[0] += 1
    peak[0] = max(peak[0], live[0])
    time.sleep(0.002)
    return i

  out = []
  for x in ordered_map(fn, range(40), workers=3, window=4):
    live[0] -= 1
    out.append(x)
  assert out == list(range(40)) and peak[0] <= 4


# --- refusals ---------------------------------------------------------------------------------

def _tampered(synth, tmp_path, name, edit):
  path, p, cfg = synth["experts"][name]
  p = jax.tree.map(np.array, p)
  edit(p)
  out = tmp_path / f"tampered_{name}"
  model_io.save_model_dir(out, p, cfg, {"stage": "expert"})
  return out


def _refused(capsys, args, *patterns):
  out = [a for a in args if a.startswith("--out=")][0][len("--out="):]
  rc = stitch_main(args + ["--no-progress"])
  err = capsys.readouterr().err
  assert rc != 0, err
  for pat in patterns:
    assert pat in err, (pat, err)
  _no_output(out)
  return err


def test_refuses_tampered_attention_in_one_expert(synth, tmp_path, capsys):
  def edit(p):
    p["decoder"]["layers"]["self_attn"]["k_proj"][1, 3, 0, 2] += 1e-6
  bad = _tampered(synth, tmp_path, "code", edit)
  err = _refused(capsys, [f"--public={synth['public']}", f"--expert=math={synth['experts']['math'][0]}",
                          f"--expert=code={bad}", f"--out={tmp_path / 'o'}"],
                 "shared tensor decoder.layers.self_attn.k_proj[1:2", f"expert 'code' ({bad})",
                 f"the public model 'public' ({synth['public']})", "[0, 3, 0, 2]")
  assert "'math'" not in err.split("differs")[0]  # the clean expert is not blamed


def test_refuses_public_half_that_differs(synth, tmp_path, capsys):
  def edit(p):
    p["decoder"]["layers"]["mlp"]["down_proj"][0, 0, 5, 1] *= 1.5
  bad = _tampered(synth, tmp_path, "math", edit)
  _refused(capsys, [f"--public={synth['public']}", f"--expert=math={bad}", f"--out={tmp_path / 'o'}"],
           "public half decoder.layers.mlp.down_proj[0:1, 0:1", f"expert 'math' ({bad})",
           f"({synth['public']})")

  def edit_router(p):
    p["decoder"]["layers"]["mlp"]["router"][1, 0, 0] += 0.5
  bad_r = _tampered(synth, tmp_path, "code", edit_router)
  _refused(capsys, [f"--public={synth['public']}", f"--expert=math={synth['experts']['math'][0]}",
                    f"--expert=code={bad_r}", f"--out={tmp_path / 'o'}"],
           "public router row decoder.layers.mlp.router[1:2, 0:1", f"expert 'code' ({bad_r})",
           "expert 'math'")


# --- declared tolerance (--shared-tolerance) ------------------------------------------------------

PUBLIC_HALVES = ("gate_proj", "up_proj", "down_proj", "router")


def _noisy(synth, tmp_path, name, noise, nan_at=None):
  """Expert NAME with every shared tensor, its public half and its public router row moved by
  exactly +-noise per element (the bf16 noise of a re-imported release); nan_at: one NaN."""
  def edit(p):
    rng = np.random.default_rng(7)
    for path, x in jax.tree_util.tree_leaves_with_path(p):
      key = ".".join(k.key for k in path)
      if key.startswith("decoder.layers.mlp."):
        if key.rsplit(".", 1)[1] not in PUBLIC_HALVES:
          continue  # router_bias: the expert's own
        x = x[:, 0]  # a view: the public half only, slot 1 is the expert's trained part
      x += (noise * rng.choice([-1.0, 1.0], size=x.shape)).astype(x.dtype)
    if nan_at:
      p["norm"]["scale"][nan_at] = np.nan
  return _tampered(synth, tmp_path, name, edit)


def _max_diff(err):
  import re
  m = re.search(r"max \|difference\| ([0-9.eE+-]+|nan|inf)", err)
  assert m, err
  return float(m.group(1))


def test_shared_tolerance_accepts_noise_and_uses_the_public_copy(synth, tmp_path, capsys):
  """Shared tensors off by 1e-4: refused bitwise (the default), accepted at 1e-3 with the
  public model's bytes written and each max difference recorded in manifest.json."""
  noisy = _noisy(synth, tmp_path, "math", 1e-4)
  args = [f"--public={synth['public']}", f"--expert=code={synth['experts']['code'][0]}",
          f"--expert=math={noisy}", f"--out={tmp_path / 'o'}"]
  err = _refused(capsys, args, "shared tensor", f"expert 'math' ({noisy})",
                 f"the public model 'public' ({synth['public']})", "--shared-tolerance=0 (bitwise)")
  assert 0.9e-4 < _max_diff(err) < 1.1e-4, err
  assert stitch_main(args + ["--shared-tolerance=1e-3", "--no-progress"]) == 0
  out = tmp_path / "o"
  man = json.loads((out / "manifest.json").read_text())
  assert man["shared_tolerance"] == 1e-3
  checks = man["shared_checks"]["tensors"]
  shared = set(man["shared_sha256"])
  halves = {f"decoder.layers.mlp.{k}[:, 0]" for k in PUBLIC_HALVES}
  assert set(checks) == shared | halves
  for tensor, rec in checks.items():
    router = tensor.startswith("decoder.layers.mlp.router")
    # The dense public model has no router: its row comes from the first expert, here clean.
    assert rec["used"] == ("code" if router else "public"), tensor
    assert 0.9e-4 < rec["max_abs_diff"]["math"] < 1.1e-4, (tensor, rec)
    assert rec["max_abs_diff"].get("code", 0.0) == 0.0, (tensor, rec)
  # Bitwise the public model's copy (and code's clean public router row), not math's.
  params, pub = _params(out), synth["pub"]
  flat = lambda t: {".".join(k.key for k in path): np.asarray(v)
                    for path, v in jax.tree_util.tree_leaves_with_path(t)}
  got, want = flat(params), flat(pub)
  for tensor in shared:
    assert got[tensor].tobytes() == want[tensor].tobytes(), tensor
  for k in ("gate_proj", "up_proj", "down_proj"):
    name = f"decoder.layers.mlp.{k}"
    assert got[name][:, 0].tobytes() == want[name].tobytes(), name
  code_router = synth["experts"]["code"][1]["decoder"]["layers"]["mlp"]["router"][:, 0]
  np.testing.assert_array_equal(got["decoder.layers.mlp.router"][:, 0], code_router)
  # math's own slot is its trained slot 1, untouched by the tolerance.
  math_gate = synth["experts"]["math"][1]["decoder"]["layers"]["mlp"]["gate_proj"][:, 1]
  np.testing.assert_array_equal(got["decoder.layers.mlp.gate_proj"][:, 2], math_gate)
  assert stitch_main([f"--verify={out}", "--no-progress"]) == 0


def test_shared_tolerance_refuses_above_it_and_non_finite(synth, tmp_path, capsys):
  noisy = _noisy(synth, tmp_path, "math", 1e-2)
  err = _refused(capsys, [f"--public={synth['public']}", f"--expert=math={noisy}",
                          f"--out={tmp_path / 'o'}", "--shared-tolerance=1e-3"],
                 "shared tensor ", f"expert 'math' ({noisy})", f"({synth['public']})",
                 "above --shared-tolerance=0.001")
  assert 0.9e-2 < _max_diff(err) < 1.1e-2, err
  # A NaN is never within a tolerance, however large.
  nan = _noisy(synth, tmp_path, "legal", 1e-5, nan_at=3)
  _refused(capsys, [f"--public={synth['public']}", f"--expert=legal={nan}",
                    f"--out={tmp_path / 'o'}", "--shared-tolerance=1"],
           "shared tensor norm.scale", "(non-finite values)", f"expert 'legal' ({nan})")
  with pytest.raises(StitchError, match="finite number >= 0"):
    stitch(synth["public"], _experts(synth, ("math",)), tmp_path / "o", shared_tolerance=-1e-3)
  _no_output(tmp_path / "o")


def test_shared_tolerance_flag_parses_and_is_listed_in_help(monkeypatch, capsys):
  monkeypatch.setenv("FLEXOLMO_PARSE_ONLY", "1")
  assert stitch_main(["--public=p", "--expert=a=b", "--out=o", "--shared-tolerance=1e-3"]) == 0
  assert stitch_main(["--public=p", "--expert=a=b", "--out=o", "--shared-tolerance=x"]) == 2
  assert "shared-tolerance" in capsys.readouterr().err
  out = subprocess.run([sys.executable, "-m", "flexolmo_jax.stitch", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr
  listing = out.stdout.split("\nflags:\n", 1)[1].splitlines()
  lines = [ln for ln in listing if "shared-tolerance" in ln]
  assert len(lines) == 1 and lines[0].startswith("  --shared-tolerance=0.0 "), lines
  assert "ATOL" in lines[0] and "bitwise" in lines[0]
  assert "[--shared-tolerance=ATOL]" in out.stdout  # the usage line too


def test_refuses_duplicate_names_and_mismatched_configs(synth, tmp_path, capsys):
  m = synth["experts"]["math"][0]
  _refused(capsys, [f"--public={synth['public']}", f"--expert=math={m}", f"--expert=math={m}",
                    f"--out={tmp_path / 'o'}"], "duplicate expert name 'math'")
  _refused(capsys, [f"--public={synth['public']}", f"--expert=public={m}",
                    f"--out={tmp_path / 'o'}"], "reserved")
  # Same shapes, different maths (rope_theta): only the config tells.
  other = tmp_path / "other_rope"
  shutil.copytree(m, other)
  cfg = json.loads((other / "model_config.json").read_text())
  cfg["rope_theta"] = 10_000.0
  (other / "model_config.json").write_text(json.dumps(cfg))
  _refused(capsys, [f"--public={synth['public']}", f"--expert=math={other}", f"--out={tmp_path / 'o'}"],
           "incompatible with the public model", "rope_theta")
  # Different architecture.
  pub_cfg = synth["pub_cfg"].replace(ffn_hidden=64)
  p, ecfg = _expert_from(jax.device_get(random_params(pub_cfg, 0)), pub_cfg, "wide", 3, (0, 0))
  model_io.save_model_dir(tmp_path / "wide", p, ecfg)
  _refused(capsys, [f"--public={synth['public']}", f"--expert=wide={tmp_path / 'wide'}",
                    f"--out={tmp_path / 'o'}"], "ffn_hidden 64 vs 48")
  # model_config.json files that lie about the stored shapes (consistent with each other).
  liars = []
  for src in (synth["public"], m):
    liar = tmp_path / f"liar_{src.name}"
    shutil.copytree(src, liar)
    c = json.loads((liar / "model_config.json").read_text())
    c.update(n_heads=2, n_kv_heads=2, head_dim=16)
    (liar / "model_config.json").write_text(json.dumps(c))
    liars.append(liar)
  _refused(capsys, [f"--public={liars[0]}", f"--expert=math={liars[1]}", f"--out={tmp_path / 'o'}"],
           f"'public' ({liars[0]}): tensor decoder.layers.self_attn.", "its model config implies")


def test_refuses_truncated_array_file(synth, tmp_path, capsys):
  bad = tmp_path / "truncated"
  shutil.copytree(synth["experts"]["legal"][0], bad)
  biggest = max((f for f in (bad / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)
  _refused(capsys, [f"--public={synth['public']}", f"--expert=legal={bad}", f"--out={tmp_path / 'o'}"],
           f"expert 'legal' ({bad})", "cannot read tensor")


def test_unknown_names_and_bad_sources_are_errors(synth, trained, tmp_path):
  out = stitch(synth["public"], _experts(synth, ("math",)), tmp_path / "s", progress=False)
  with pytest.raises(UnknownExpertError, match="'nope'"):
    flexolmo_jax.load(out, exclude=["nope"])
  with pytest.raises(UnknownExpertError, match="unknown"):
    stitch(synth["public"], _experts(synth, ("math",)), tmp_path / "t", drop=["nope"])
  with pytest.raises(UnknownExpertError, match="dense"):
    flexolmo_jax.load(synth["public"], exclude=["math"])
  unfinished = tmp_path / "unfinished"
  shutil.copytree(trained["math"], unfinished, ignore=shutil.ignore_patterns("export"))
  with pytest.raises(SourceError, match="without an export"):
    flexolmo_jax.load(unfinished)
  with pytest.raises(StitchError, match="already exists"):
    stitch(synth["public"], _experts(synth, ("math",)), out, progress=False)


# --- atomicity ---------------------------------------------------------------------------------

def test_kill_9_mid_stitch_leaves_nothing_finished_and_rerun_succeeds(synth, tmp_path):
  out = tmp_path / "stitched"
  partial = tmp_path / ".stitched.partial"
  args = [sys.executable, "-m", "flexolmo_jax.stitch", f"--public={synth['public']}",
          *[f"--expert={n}={p}" for n, p in _experts(synth)], f"--out={out}", "--no-progress"]
  env = dict(os.environ, FLEXOLMO_STITCH_PIECE_DELAY="0.05", PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 60
  # orbax writes the params into its own temporary directory inside the partial one
  written = lambda: len([f for f in partial.rglob("*") if f.is_file()]) if partial.exists() else 0
  while written() < 10 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not out.exists()
  assert partial.exists() and written() >= 10  # killed mid-way, after real work
  assert not model_io.is_model_dir(partial)  # the leftover does not look finished
  with pytest.raises(Exception):
    model_io.load_params(partial)
  rc = subprocess.run(args, env=dict(env, FLEXOLMO_STITCH_PIECE_DELAY="0"), capture_output=True)
  assert rc.returncode == 0, rc.stderr.decode()[-2000:]
  assert model_io.is_model_dir(out) and not partial.exists()
  clean = stitch(synth["public"], _experts(synth), tmp_path / "clean", progress=False)
  a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, clean))
  assert a["shared_sha256"] == b["shared_sha256"]
  assert [e["slot_sha256"] for e in a["experts"]] == [e["slot_sha256"] for e in b["experts"]]


def test_training_workdir_exports_to_transformers_with_its_tokenizer(trained, tmp_path):
  """A workdir converts directly; the tokenizer is found through its checkpoints' metadata."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from flexolmo_jax.convert.to_hf import ConvertError, to_hf
  from flexolmo_jax.evaluate.routing import without_bias
  # An owner's 2-expert model carries its learned bias (-softplus(theta) < 0), which
  # transformers cannot hold: refused, nothing written, unless the bias is dropped.
  with pytest.raises(ConvertError, match="learned expert bias"):
    to_hf(trained["math"], tmp_path / "refused", dtype="float32", progress=False)
  assert not (tmp_path / "refused").exists()
  out = to_hf(trained["math"], tmp_path / "hf", dtype="float32", progress=False, drop_bias=True)
  assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ours = flexolmo_jax.load(trained["math"], dtype="float32")
  ours.params = without_bias(ours.params)  # what the export holds
  ids = np.asarray(random_ids(ours.config, seed=5))
  with torch.no_grad():
    ref = hf(torch.as_tensor(np.array(ids), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ref, ours.logits(ids), atol=1e-4, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.eos_token_id == ours.config.eos_token_id
