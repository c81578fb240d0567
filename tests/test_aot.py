"""AOT planning: the real train / eval steps compile for a TPU topology on this CPU host."""
import os
import pathlib
import subprocess
import sys

import pytest

from flexolmo_jax.aot import chip_for, libtpu_installed
from flexolmo_jax.aot.hlo import collective_bytes
from train_utils import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    not libtpu_installed(),
    reason="libtpu is not installed (pip install -e '.[tpu]'): cannot compile for TPU")


def _quiet(*args):
  pass


@needs_libtpu
def test_train_step_plan_on_a_small_topology():
  from flexolmo_jax.aot import plan
  r = plan(load_config("tiny", "expert"), "v5p:2x2x1", "train", seq_len=64, per_device_batch=2,
           log=_quiet)
  assert r["chips"] == 4 and r["global_batch"] == 8 and r["mesh"]["fsdp"] == 4
  assert r["fits"] and 0 < r["total_gb"] < 1
  assert r["arguments_gb"] > 0 and r["temporaries_gb"] > 0
  assert r["flops_per_chip"] > 0 and r["collective_bytes_per_chip"] > 0
  assert 0 < r["mfu"] <= 1 and r["step_s"] == max(r["t_compute_s"], r["t_hbm_s"], r["t_ici_s"])


@needs_libtpu
def test_layer_extrapolation_matches_the_unrolled_program(mode="train"):
  """cost(2 layers) + (L - 2) * (cost(3) - cost(2)) == XLA's cost of all L layers unrolled
  (XLA counts a scanned loop body only once, so the scanned program itself cannot say)."""
  from flexolmo_jax.aot import planner as plan_mod
  config = load_config("tiny", "expert")
  config.model.n_layers = 5
  config.model.remat_policy = "full"
  r = plan_mod.plan(config, "v5p:2x2x1", mode, seq_len=64, per_device_batch=1, log=_quiet)
  prepared, shape = plan_mod.prepare_config(config, mode, 4, 64, None, 1)
  mesh = plan_mod.make_mesh(prepared.mesh.to_dict(), plan_mod.topology_devices("v5p:2x2x1"))
  full = plan_mod._costs(plan_mod._compile(plan_mod._layer_variant(prepared, 5), mode, mesh,
                                           shape), 4)
  assert r["xla_flops_per_chip"] == pytest.approx(full["flops"], rel=0.02)
  assert r["hbm_bytes_per_chip"] == pytest.approx(full["bytes"], rel=0.05)
  assert r["collective_bytes_per_chip"] == pytest.approx(full["collective_bytes"], rel=0.05)


@needs_libtpu
def test_step_flops_are_the_models_matmuls():
  """Dense eval step: the traced matmul FLOPs are exactly the model's forward FLOPs; the
  train step (full remat) adds a recomputed forward and the backward (4x the forward for
  the layers; frozen parameters get no weight gradient)."""
  from flexolmo_jax.aot import plan
  from flexolmo_jax.config_base import model_config
  from flexolmo_jax.model.flops import forward_flops
  config = load_config("tiny", "dense")
  cfg = model_config(config)
  r = plan(config, "v5p:2x2x1", "eval", seq_len=64, global_batch_size=8, extrapolate=False,
           log=_quiet)
  assert r["flops_per_chip"] * 4 == forward_flops(cfg, 8, 64) == r["model_flops"]
  config.model.remat_policy = "full"
  t = plan(config, "v5p:2x2x1", "train", seq_len=64, global_batch_size=8, extrapolate=False,
           log=_quiet)
  assert 3.5 < t["flops_per_chip"] * 4 / forward_flops(cfg, 8, 64) <= 4.0


@needs_libtpu
def test_eval_step_plan_multislice():
  from flexolmo_jax.aot import plan
  config = load_config("tiny", "moe4")
  config.mesh.data = 2
  r = plan(config, "v5p:2x2x1", "eval", seq_len=64, global_batch_size=8, num_slices=2,
           extrapolate=False, log=_quiet)
  assert r["chips"] == 8 and r["slices"] == 2 and r["mesh"]["data"] == 2
  assert r["fits"] and r["flops_per_chip"] > 0


@needs_libtpu
def test_cli_exit_status():
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  base = [sys.executable, "-m", "flexolmo_jax.aot", f"--config={ROOT / 'configs' / 'tiny.py'}:expert",
          "--mode=eval", "--seq_len=64", "--extrapolate=false"]
  p = subprocess.run(base + ["--topology=v5p:2x2x1", "--hbm_gb=0.000001"], capture_output=True,
                     text=True, cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 1, p.stderr[-2000:]
  assert "DOES NOT FIT" in p.stdout and '"fits": false' in p.stdout
  p = subprocess.run(base + ["--topology=v9z:2x2"], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=300)
  assert p.returncode == 2 and "unknown TPU generation 'v9z'" in p.stderr


def test_chip_table_and_collective_parser():
  assert chip_for("v5p:4x4x4").hbm_bytes == 95e9
  assert chip_for("v6e:4x4").peak_flops == 918e12
  with pytest.raises(ValueError, match="unknown TPU generation"):
    chip_for("h100:8")
  hlo = "\n".join([
      "  %ag = bf16[64,1024]{1,0} all-gather(%p), replica_groups={{0,1,2,3}}, dimensions={0}",
      "  %rs = f32[16,1024]{1,0} reduce-scatter(%q), replica_groups=[1,4]<=[4], dimensions={0}",
      "  %ar-start = (f32[256]{0}, f32[256]{0}) all-reduce-start(%r), "
      "replica_groups=mesh['x'=2,'y'=4] {'y'}",
      "  %ar-done = f32[256]{0} all-reduce-done(%ar-start)",
      "  %add = f32[256]{0} add(%a, %b)",
  ])
  c = collective_bytes(hlo, 4)
  assert c["all-gather"] == 64 * 1024 * 2 * 3 / 4
  assert c["reduce-scatter"] == 16 * 1024 * 4 * 3
  assert c["all-reduce"] == 2 * 256 * 4 * 3 / 4
  assert c["total"] == c["all-gather"] + c["reduce-scatter"] + c["all-reduce"]
