"""Training stages: frozen means frozen and free, sharded == single device, guards, learning."""
import json
import math

import jax
import numpy as np
import pytest

from flexolmo_jax.storage import model_io
from flexolmo_jax.storage import checkpoints as ckpt
from flexolmo_jax.train.init import expert_from_public, load_embedding
from flexolmo_jax.train.trainer import TrainingError, train
from train_utils import tiny_stage_config


def expert_config(public_model, **train_kw):
  config = tiny_stage_config("expert", public_model["data"], "math", **train_kw)
  config.init.public = str(public_model["dir"])
  config.init.public_embedding = str(public_model["embeddings"]["public"])
  config.init.domain_embedding = str(public_model["embeddings"]["math"])
  return config


def initial_expert_params(public_model, cfg):
  public_cfg = model_io.read_config(public_model["dir"])
  public = model_io.load_params(public_model["dir"], public_cfg)
  r_pub = load_embedding(public_model["embeddings"]["public"], cfg.d_model, "public")
  r_dom = load_embedding(public_model["embeddings"]["math"], cfg.d_model, "domain")
  return jax.device_get(expert_from_public(public, public_cfg, cfg, r_pub, r_dom))


def test_public_stage_learns(public_model):
  s = public_model["summary"]
  assert s["step"] == 40
  assert s["eval_loss"]["public"] < math.log(8192) - 0.5  # well below a uniform guess
  assert model_io.is_model_dir(public_model["dir"])


def test_expert_stage_frozen_means_frozen_and_free(public_model, tmp_path):
  config = expert_config(public_model, steps=6, log_every=3)
  train(config, tmp_path)
  cfg = model_io.read_config(tmp_path / "export")
  start = initial_expert_params(public_model, cfg)
  end = jax.device_get(model_io.load_params(tmp_path / "export", cfg))
  changed = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(start), jax.tree_util.tree_leaves(end)):
    key = jax.tree_util.keystr(path)
    a, b = np.asarray(a), np.asarray(b)
    if "'mlp'" in key:
      # Slot 0 (public FFN, public router row, no bias) stays bit-identical; slot 1 moves.
      np.testing.assert_array_equal(a[:, 0], b[:, 0], err_msg=key)
      if not np.array_equal(a[:, 1], b[:, 1]):
        changed.append(key)
    else:
      np.testing.assert_array_equal(a, b, err_msg=key)  # attention, norms, embeddings, lm_head
  assert {"['decoder']['layers']['mlp']['gate_proj']", "['decoder']['layers']['mlp']['up_proj']",
          "['decoder']['layers']['mlp']['down_proj']",
          "['decoder']['layers']['mlp']['router']"} <= set(changed)

  # Optimizer state: AdamW mu and nu for exactly the trainable slice, nothing for the rest.
  manager = ckpt.make_manager(tmp_path, 1, 3)
  restored, _ = ckpt.restore_as_saved(manager, manager.latest_step())
  trainable = sum(np.size(x) for x in jax.tree.leaves(restored["params"]))
  L, d, I = cfg.n_layers, cfg.d_model, cfg.ffn_hidden
  assert trainable == L * (3 * d * I + d + 1)  # expert 1's FFN, its router row, its bias
  float_state = sum(np.size(x) for x in jax.tree.leaves(restored["opt_state"])
                    if np.asarray(x).dtype.kind == "f")
  assert float_state == 2 * trainable


def test_sharded_training_equals_single_device(public_model, tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 host devices")
  runs = {}
  for name, mesh, devices in [("one", dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1]),
                              ("eight", dict(data=2, fsdp=2, expert=2, tensor=1), jax.devices())]:
    config = expert_config(public_model, steps=5, log_every=1)
    config.mesh.update(mesh)
    config.model.dtype = "float32"  # bf16 rounding differs by layout; compare the maths in fp32
    config.eval.sources = {}
    train(config, tmp_path / name, devices=devices)
    runs[name] = jax.device_get(model_io.load_params(tmp_path / name / "export",
                                                     model_io.read_config(tmp_path / name / "export")))
  for a, b in zip(jax.tree.leaves(runs["one"]), jax.tree.leaves(runs["eight"])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # Losses per step, from the TensorBoard-free summary of the last step (and the params above).
  s1 = json.loads((tmp_path / "one" / "summary.json").read_text())["train"]
  s8 = json.loads((tmp_path / "eight" / "summary.json").read_text())["train"]
  assert s1["loss"] == pytest.approx(s8["loss"], abs=1e-5)


def test_expert_beats_public_on_its_domain(public_model, tmp_path):
  config = expert_config(public_model, steps=40, log_every=10, lr=3e-3)
  config.eval.sources = {"math": "math", "public": "public"}
  summary = train(config, tmp_path)
  public_loss = public_model["summary"]["eval_loss"]["math"]
  assert summary["eval_loss"]["math"] < public_loss - 0.05, (summary["eval_loss"], public_loss)


def test_non_finite_update_stops_and_keeps_last_good_checkpoint(public_model, tmp_path):
  config = expert_config(public_model, steps=4, log_every=2)
  config.checkpoint.every = 2
  config.eval.sources = {}
  train(config, tmp_path)
  config.train.steps = 8
  config.train.lr = float("nan")
  with pytest.raises(TrainingError, match="non-finite"):
    train(config, tmp_path)
  manager = ckpt.make_manager(tmp_path, 2, 3)
  assert manager.latest_step() == 4
  state, _ = ckpt.restore_as_saved(manager, 4)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_resume_refuses_a_different_init(public_model, tmp_path):
  config = expert_config(public_model, steps=2, log_every=1)
  config.eval.sources = {}
  train(config, tmp_path)
  config.train.steps = 4
  config.init.domain_embedding = str(public_model["embeddings"]["code"])
  with pytest.raises(TrainingError, match="different init"):
    train(config, tmp_path)


def test_resume_refuses_another_bias_parametrization(public_model, tmp_path):
  """A checkpoint's bias leaf is theta (softplus) or b (min): never read one as the other."""
  config = expert_config(public_model, steps=2, log_every=1)
  config.eval.sources = {}
  assert config.train.bias_parametrization == "softplus"
  train(config, tmp_path)
  config.train.steps = 4
  config.train.bias_parametrization = "min"
  with pytest.raises(TrainingError, match="bias_parametrization=softplus"):
    train(config, tmp_path)


def test_bad_init_inputs_are_clear(public_model, tmp_path):
  from flexolmo_jax.train.init import InitError
  config = expert_config(public_model, steps=2)
  config.init.domain_embedding = str(tmp_path / "missing.npy")
  with pytest.raises(InitError, match="not found"):
    train(config, tmp_path / "a")
  np.save(tmp_path / "wide.npy", np.ones(7, np.float32))
  config.init.domain_embedding = str(tmp_path / "wide.npy")
  with pytest.raises(InitError, match=r"shape \(7,\)"):
    train(config, tmp_path / "b")
  config = tiny_stage_config("public", public_model["data"], steps=2)
  config.train.trainable = ["no_such_param"]
  with pytest.raises(ValueError, match="match no parameter"):
    train(config, tmp_path / "c")


def _largest_file(path):
  return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_resume_sets_aside_a_damaged_step_and_uses_the_previous_one(public_model, tmp_path,
                                                                     caplog):
  import logging
  import shutil
  config = expert_config(public_model, steps=8, log_every=2)
  config.checkpoint.every = 2
  config.checkpoint.keep = 3
  config.eval.sources = {}
  train(config, tmp_path)  # checkpoints 4, 6, 8
  reference = tmp_path.parent / (tmp_path.name + "_reference_export")
  shutil.move(tmp_path / "export", reference)
  victim = _largest_file(tmp_path / "checkpoints" / "8")
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

  with caplog.at_level(logging.WARNING):
    summary = train(config, tmp_path)
  assert summary["step"] == 8
  warned = "\n".join(r.getMessage() for r in caplog.records)
  assert "checkpoint step 8" in warned and "set aside" in warned, warned
  assert "resuming from step 6" in warned, warned
  assert (tmp_path / "checkpoints" / "damaged" / "8-1").is_dir()  # kept, not deleted
  manager = ckpt.make_manager(tmp_path, 2, 3)
  assert manager.latest_step() == 8  # step 8 saved again by the resumed run
  cfg = model_io.read_config(reference)
  for a, b in zip(jax.tree.leaves(jax.device_get(model_io.load_params(reference, cfg))),
                  jax.tree.leaves(jax.device_get(model_io.load_params(tmp_path / "export", cfg)))):
    np.testing.assert_array_equal(a, b)


def test_resume_with_every_step_damaged_names_each_step(public_model, tmp_path):
  config = expert_config(public_model, steps=4, log_every=2)
  config.checkpoint.every = 2
  config.eval.sources = {}
  train(config, tmp_path)  # checkpoints 1 (orbax always saves the first), 2, 4
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  for step in steps:
    victim = _largest_file(tmp_path / "checkpoints" / str(step))
    victim.write_bytes(victim.read_bytes()[:7])
  config.train.steps = 6
  with pytest.raises(TrainingError, match=r"no checkpoint .* step 4: .*; step 2: ") as err:
    train(config, tmp_path)
  assert "not valid for value of size 7" in str(err.value)  # tensorstore's cause, not its spec
  assert (tmp_path / "checkpoints" / "4").is_dir()  # nothing moved when none restores


def test_resume_refuses_a_frozen_source_overwritten_in_place(public_model, tmp_path):
  import shutil
  from flexolmo_jax.storage import param_store
  public = tmp_path / "public_export"
  shutil.copytree(public_model["dir"], public)
  config = expert_config(public_model, steps=2, log_every=1)
  config.init.public = str(public)
  config.eval.sources = {}
  train(config, tmp_path / "work")
  _, saved_meta = ckpt.restore_as_saved(ckpt.make_manager(tmp_path / "work", 1, 3), 2)
  names = sorted(saved_meta["frozen_sha256"])
  assert saved_meta["frozen_sha256"] == param_store.content_digest(public)

  # Same path, shapes and meta.json (so the path/metadata fingerprint cannot tell); two tensors
  # get new values: the refusal names the first of them in sorted order.
  cfg = model_io.read_config(public)
  params = jax.device_get(model_io.load_params(public, cfg))
  flat = {".".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  first, later = names[len(names) // 2], names[-1]
  changed = {first: flat[first] * 1.5, later: flat[later] + 1}
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: changed.get(".".join(k.key for k in path), x), params)
  model_io.save_model_dir(public, params, cfg, model_io.read_meta(public), overwrite=True)
  config.train.steps = 4
  with pytest.raises(TrainingError, match=rf"frozen source .* changed .*tensor {first} "):
    train(config, tmp_path / "work")
