"""Streaming conversion: transformers <-> model dirs, bitwise round trips, logits parity, refusals."""
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flexolmo_jax  # noqa: E402
from flexolmo_jax.storage import model_io  # noqa: E402
from flexolmo_jax.convert.__main__ import main as convert_main  # noqa: E402
from flexolmo_jax.convert.safetensors_io import Reader, save_shard  # noqa: E402
from flexolmo_jax.stitch import stitch  # noqa: E402
from test_hf_parity import _hf_flex, _hf_logits, _hf_olmo2, _ids  # noqa: E402

TOL = 1e-4


def _tensors(folder):
  """Every tensor of an HF folder (numpy, bf16 as ml_dtypes), by key."""
  out = {}
  for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
    r = Reader(f)
    for k in r.keys():
      out[k] = r.read(k)
  return out


def _run(capsys, *args):
  rc = convert_main([*map(str, args), "--no-progress"])
  return rc, capsys.readouterr().err


def _round_trip(model, tmp_path, capsys, shard="30KB"):
  hf_dir, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
  model.save_pretrained(hf_dir, max_shard_size=shard)
  assert _run(capsys, "from_hf", f"--hf={hf_dir}", f"--out={ours}")[0] == 0
  assert _run(capsys, "to_hf", f"--ckpt={ours}", f"--out={back}", "--max-shard-size=40KB")[0] == 0
  return hf_dir, ours, back


def _assert_bitwise(a_dir, b_dir):
  a, b = _tensors(a_dir), _tensors(b_dir)
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("case", [(3, 4, 2, 32, 4, 2, True, 131), (2, 6, 3, 48, 3, 3, False, 77)])
def test_flexolmo_round_trip_bitwise_and_logits(case, tmp_path, capsys):
  hf = _hf_flex(*case, seed=5)
  hf_dir, ours, back = _round_trip(hf, tmp_path, capsys)
  assert len(list(hf_dir.glob("*.safetensors"))) > 1  # the source really is sharded
  _assert_bitwise(hf_dir, back)
  conf = json.loads((back / "config.json").read_text())
  assert conf["model_type"] == "flex_olmo" and conf["num_experts"] == case[4]
  assert conf["num_experts_per_tok"] == case[5] and conf["norm_topk_prob"] == case[6]
  assert (conf["eos_token_id"], conf["pad_token_id"]) == (1, 0)
  index = json.loads((back / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert set(index["weight_map"]) == set(_tensors(back))
  ids = _ids(case[-1], 2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  assert type(reloaded).__name__ == "FlexOlmoForCausalLM"
  ours_logits = flexolmo_jax.load(ours, dtype="float32").logits(ids)
  np.testing.assert_allclose(_hf_logits(reloaded, ids), ours_logits, atol=TOL, rtol=0)
  np.testing.assert_allclose(_hf_logits(hf, ids), ours_logits, atol=TOL, rtol=0)


def test_olmo2_import_round_trip_and_use_as_public_model(tmp_path, capsys):
  hf = _hf_olmo2(3, 4, 2, 32, 89, seed=3)
  hf_dir, ours, back = _round_trip(hf, tmp_path, capsys)
  _assert_bitwise(hf_dir, back)
  conf = json.loads((back / "config.json").read_text())
  assert conf["model_type"] == "olmo2" and "num_experts" not in conf
  ids = _ids(89, 1)
  model = flexolmo_jax.load(ours, dtype="float32")
  assert model.expert_names == () and not model.config.is_moe
  np.testing.assert_allclose(_hf_logits(hf, ids), model.logits(ids), atol=TOL, rtol=0)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  assert type(reloaded).__name__ == "Olmo2ForCausalLM"
  np.testing.assert_allclose(_hf_logits(reloaded, ids), model.logits(ids), atol=TOL, rtol=0)
  # An import is a public model: the public stage restores it into its own config (fp32 here).
  cfg = model_io.read_config(ours).replace(param_dtype="float32", dtype="float32")
  params = model_io.load_params(ours, cfg)
  assert params["embed_tokens"].shape == (89, 32)


def test_bf16_round_trip_is_bitwise(tmp_path, capsys):
  hf = _hf_flex(2, 4, 2, 32, 3, 2, False, 97, seed=1).to(torch.bfloat16)
  hf_dir, ours, back = _round_trip(hf, tmp_path, capsys, shard="10KB")
  assert model_io.read_config(ours).param_dtype == "bfloat16"
  _assert_bitwise(hf_dir, back)
  assert next(iter(_tensors(back).values())).dtype.name == "bfloat16"
  # Imported upcast to fp32, exported back to bf16: lossless both ways.
  f32 = tmp_path / "f32"
  assert _run(capsys, "from_hf", f"--hf={hf_dir}", f"--out={f32}", "--param-dtype=float32")[0] == 0
  assert _run(capsys, "to_hf", f"--ckpt={f32}", f"--out={tmp_path / 'b16'}", "--dtype=bfloat16")[0] == 0
  _assert_bitwise(hf_dir, tmp_path / "b16")


@pytest.fixture(scope="module")
def stitched(tmp_path_factory):
  """A stitched 4-expert model (public + 3) with active learned biases, kept and dropped."""
  from test_stitch import _expert_from
  from model_utils import random_params, tiny_config
  root = tmp_path_factory.mktemp("conv_stitch")
  pub_cfg = tiny_config(num_experts=0, top_k=1)
  pub = jax.device_get(random_params(pub_cfg, 0))
  model_io.save_model_dir(root / "public", pub, pub_cfg)
  experts = []
  for i, (name, bias) in enumerate([("math", (-0.5, -0.1)), ("code", (0.0, 0.0)), ("news", (0.0, -2.0))]):
    p, cfg = _expert_from(pub, pub_cfg, name, 20 + i, bias)
    model_io.save_model_dir(root / name, p, cfg)
    experts.append((name, root / name))
  plain = stitch(root / "public", experts, root / "plain", top_k=2, progress=False)
  biased = stitch(root / "public", experts, root / "biased", top_k=2, keep_bias=True, progress=False)
  return {"plain": plain, "biased": biased, "root": root}


def test_export_with_exclude_matches_runtime_opt_out(stitched, tmp_path, capsys):
  out = tmp_path / "hf"
  rc, err = _run(capsys, "to_hf", f"--ckpt={stitched['plain']}", f"--out={out}", "--exclude=code",
                 "--dtype=float32")
  assert rc == 0, err
  conf = json.loads((out / "config.json").read_text())
  assert conf["num_experts"] == 3 and conf["flexolmo_expert_names"] == ["public", "math", "news"]
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = _ids(97, 6)
  ours = flexolmo_jax.load(stitched["plain"], exclude=["code"], dtype="float32").logits(ids)
  np.testing.assert_allclose(_hf_logits(hf, ids), ours, atol=TOL, rtol=0)
  full = flexolmo_jax.load(stitched["plain"], dtype="float32").logits(ids)
  assert np.abs(full - ours).max() > 1e-3  # excluding "code" did change the model


def test_learned_bias_export_is_refused_unless_dropped(stitched, tmp_path, capsys):
  out = tmp_path / "hf"
  rc, err = _run(capsys, "to_hf", f"--ckpt={stitched['biased']}", f"--out={out}")
  assert rc == 1 and "learned expert bias" in err and "--drop-bias" in err
  assert "'math'" in err and "'news'" in err and "'code'" not in err.split("--drop-bias")[0]
  assert not out.exists()
  # Excluding the biased experts leaves nothing to misrepresent: exact export.
  rc, err = _run(capsys, "to_hf", f"--ckpt={stitched['biased']}", f"--out={out}",
                 "--exclude=math,news")
  assert rc == 0, err
  shutil.rmtree(out)
  rc, err = _run(capsys, "to_hf", f"--ckpt={stitched['biased']}", f"--out={out}", "--drop-bias")
  assert rc == 0, err
  assert not any("bias" in k for k in _tensors(out))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = _ids(97, 7)
  plain = flexolmo_jax.load(stitched["plain"], dtype="float32").logits(ids)  # the no-bias model
  np.testing.assert_allclose(_hf_logits(hf, ids), plain, atol=TOL, rtol=0)


def test_refusals_leave_no_output(stitched, tmp_path, capsys):
  out = tmp_path / "o"
  rc, err = _run(capsys, "to_hf", f"--ckpt={stitched['plain']}", f"--out={out}", "--exclude=nope")
  assert rc == 1 and "unknown expert name(s) ['nope']" in err
  rc, err = _run(capsys, "to_hf", f"--ckpt={stitched['plain']}", f"--out={out}",
                 "--exclude=public,math,code,news")
  assert rc == 1 and "leaves no expert" in err
  # A truncated safetensors shard is refused before anything is written.
  hf = _hf_flex(1, 2, 2, 32, 2, 1, False, 97, seed=0)
  hf_dir = tmp_path / "hf"
  hf.save_pretrained(hf_dir, max_shard_size="20KB")
  shard = sorted(hf_dir.glob("*.safetensors"))[1]
  os.truncate(shard, shard.stat().st_size - 100)
  rc, err = _run(capsys, "from_hf", f"--hf={hf_dir}", f"--out={out}")
  assert rc == 1 and shard.name in err and "truncated" in err
  # A shard whose tensors do not fit config.json.
  conf = json.loads((hf_dir / "config.json").read_text())
  conf["intermediate_size"] += 8
  good = tmp_path / "hf2"
  hf.save_pretrained(good)
  (good / "config.json").write_text(json.dumps(conf))
  rc, err = _run(capsys, "from_hf", f"--hf={good}", f"--out={out}")
  assert rc == 1 and "gate_proj.weight has shape" in err
  assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_tokenizer_files_travel(tmp_path, capsys):
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {f"w{i}": i for i in range(97)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w2"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  hf = _hf_olmo2(1, 2, 2, 32, 97, seed=1)
  hf_dir = tmp_path / "hf"
  hf.save_pretrained(hf_dir)
  tok.save(str(hf_dir / "tokenizer.json"))
  (hf_dir / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "w1", "pad_token": "w0"}))
  assert _run(capsys, "from_hf", f"--hf={hf_dir}", f"--out={tmp_path / 'ours'}")[0] == 0
  assert (tmp_path / "ours" / "tokenizer" / "tokenizer.json").is_file()
  assert _run(capsys, "to_hf", f"--ckpt={tmp_path / 'ours'}", f"--out={tmp_path / 'back'}")[0] == 0
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "back" / name).read_bytes() == (hf_dir / name).read_bytes()
  # A lone tokenizer.json (this project's data tokenizer) gets a generated config.
  lone = tmp_path / "lone.json"
  tok.save(str(lone))
  out = tmp_path / "lone_out"
  assert _run(capsys, "to_hf", f"--ckpt={tmp_path / 'ours'}", f"--out={out}", f"--tokenizer={lone}")[0] == 0
  t = transformers.AutoTokenizer.from_pretrained(out)
  assert t.eos_token == "w1" and t.encode("w5 w7") == [5, 7]


def test_safetensors_shard_round_trip_and_row_slices(tmp_path):
  import ml_dtypes
  a = np.arange(12, dtype=np.float32).reshape(4, 3)
  b = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  save_shard(tmp_path / "x.safetensors", {"a": a, "b": b})
  from safetensors.numpy import load_file
  got = load_file(str(tmp_path / "x.safetensors"))
  np.testing.assert_array_equal(got["a"], a)
  r = Reader(tmp_path / "x.safetensors")
  assert r.shape("b") == (2, 3) and r.dtype("b") == b.dtype
  np.testing.assert_array_equal(r.read("a", slice(1, 3)), a[1:3])  # a block of rows
  assert r.read("b").tobytes() == b.tobytes()


def test_import_reads_transformers_fused_expert_layout(tmp_path):
  """Some tools save transformers' in-memory layout (mlp.experts.gate_up_proj [E, 2I, d])."""
  from flexolmo_jax.convert import hf_mapping
  from flexolmo_jax.convert.from_hf import from_hf
  hf = _hf_flex(2, 4, 2, 32, 3, 2, False, 97, seed=8)
  fused = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  assert any(k.endswith("experts.gate_up_proj") for k in fused)
  hf_dir = tmp_path / "fused"
  hf_dir.mkdir()
  keys = sorted(fused)
  save_shard(hf_dir / "model.safetensors", {k: fused[k] for k in keys})
  (hf_dir / "config.json").write_text(json.dumps(hf.config.to_dict()))
  from_hf(hf_dir, tmp_path / "ours", progress=False)
  ids = _ids(97, 9)
  np.testing.assert_allclose(flexolmo_jax.load(tmp_path / "ours", dtype="float32").logits(ids),
                             _hf_logits(hf, ids), atol=TOL, rtol=0)
  cfg = model_io.read_config(tmp_path / "ours")
  per_expert = hf_mapping.params_to_hf(jax.device_get(model_io.load_params(tmp_path / "ours")), cfg)
  np.testing.assert_array_equal(per_expert["model.layers.1.mlp.experts.2.up_proj.weight"],
                                fused["model.layers.1.mlp.experts.gate_up_proj"][2, cfg.ffn_hidden:])
