"""AOT planning: the real train / eval steps compile for a TPU topology on this CPU host; the
FLOP counts, the model-FLOP formula and the calibration are checked against each other."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from flexolmo_jax import config_base
from flexolmo_jax.aot import calibration, chip_for, libtpu_installed
from flexolmo_jax.aot.hlo import KINDS, collective_bytes, largest_buffers
from flexolmo_jax.aot.jaxpr_flops import matmul_flops, matmul_flops_detail
from flexolmo_jax.model import flops
from train_utils import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    not libtpu_installed(),
    reason="libtpu is not installed (pip install -e '.[tpu]'): cannot compile for TPU")


def _quiet(*args):
  pass


@needs_libtpu
def test_train_step_plan_on_a_small_topology():
  from flexolmo_jax.aot import plan, report
  r = plan(load_config("tiny", "expert"), "v5p:2x2x1", "train", seq_len=64, per_device_batch=2,
           log=_quiet)
  assert r["chips"] == 4 and r["global_batch"] == 8 and r["mesh"]["fsdp"] == 4
  assert r["fits"] and 0 < r["total_gb"] < 1
  for key in ("arguments_gb", "temporaries_gb", "outputs_gb", "aliased_gb"):
    assert r[key] > 0, key
  assert r["total_gb"] == pytest.approx(r["arguments_gb"] + r["temporaries_gb"] + r["outputs_gb"]
                                        + r["code_gb"] - r["aliased_gb"])
  # [B/4, H, T, T] f32 scores and [B/4, T, V] f32 logits, as materialised by attention=xla.
  assert r["largest_scores_gb"] * 1e9 >= 2 * 4 * 64 * 64 * 4
  assert r["largest_logits_gb"] * 1e9 >= 2 * 64 * 512 * 4
  c = r["collectives_per_chip"]
  assert set(c) == {*KINDS, "total"} and c["total"] == pytest.approx(sum(c[k] for k in KINDS))
  assert c["all-gather"] > 0 and r["collective_bytes_per_chip"] == c["total"]
  assert r["executed_flops_per_chip"] > 0 and r["xla_flops_per_chip"] > 0
  assert r["roofline_step_s"] == max(r["t_compute_s"], r["t_hbm_s"], r["t_ici_s"])
  assert "mfu" not in r  # the uncalibrated roofline ratio is not an MFU
  if calibration.efficiency():
    assert r["calibrated_mfu"] == pytest.approx(
        r["roofline_mfu_bound"] * calibration.efficiency())
  text = report(r)
  assert "executed" in text and "model" in text and "collectives per chip" in text


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
  for kind in (*KINDS, "total"):
    assert r["collectives_per_chip"][kind] == pytest.approx(full[f"coll:{kind}"], rel=0.05,
                                                            abs=1e3), kind


@needs_libtpu
def test_batch_extrapolation_matches_the_direct_program():
  """The fallback for variants that do not fit: costs at 1 and 2 sequences per chip,
  extrapolated affinely, against the costs at 4 per chip compiled directly."""
  from flexolmo_jax.aot import planner as plan_mod
  config = load_config("tiny", "expert")
  prepared, _ = plan_mod.prepare_config(config, "train", 4, 64, None, 1)
  mesh = plan_mod.make_mesh(prepared.mesh.to_dict(), plan_mod.topology_devices("v5p:2x2x1"))
  costs = []
  for per_chip in (1, 2, 4):
    variant, shape = plan_mod._with_batch(prepared, "train", 4 * per_chip)
    costs.append(plan_mod._layer_costs(variant, "train", mesh, shape, 4, _quiet))
  c1, c2, c4 = costs
  # FLOPs and HBM bytes are affine in the batch; XLA's collective choices less so (13% off
  # here, the tiny model's activation collectives being as large as its weight gathers).
  for key, rel in (("flops", 0.02), ("bytes", 0.05), ("coll:total", 0.2)):
    assert c1[key] + 3 * (c2[key] - c1[key]) == pytest.approx(c4[key], rel=rel), key
  assert c4["flops"] > c1["flops"]


@needs_libtpu
def test_executed_flops_against_model_flops():
  """Dense eval: the traced matmuls are the model's forward with the full attention square
  (the model convention halves it for the causal mask). Train with full remat: a recomputed
  forward and the backward on top, 4x the forward at most."""
  from flexolmo_jax.aot import plan
  config = load_config("tiny", "dense")
  cfg = config_base.model_config(config)
  r = plan(config, "v5p:2x2x1", "eval", seq_len=64, global_batch_size=8, extrapolate=False,
           log=_quiet)
  assert r["executed_flops_per_chip"] * 4 == flops.forward_flops(cfg, 8, 64, causal=False)
  assert r["model_flops"] == flops.forward_flops(cfg, 8, 64) < r["executed_flops_per_chip"] * 4
  config.model.remat_policy = "full"
  t = plan(config, "v6e:2x2", "train", seq_len=64, global_batch_size=8, extrapolate=False,
           log=_quiet)
  ratio = t["executed_flops_per_chip"] * 4 / flops.forward_flops(cfg, 8, 64, causal=False)
  assert 3.5 < ratio <= 4.0
  assert t["model_flops"] == flops.train_flops(cfg, 8, 64) == 3 * r["model_flops"]


@needs_libtpu
def test_expert_stage_executes_less_than_training_everything():
  """Expert training skips the weight gradients of everything frozen, so it executes fewer
  FLOPs than training every parameter, while the MFU convention counts both the same (6N)."""
  from flexolmo_jax.aot import plan
  expert = load_config("tiny", "expert")  # the planner adds the expert stage (2 experts)
  everything = load_config("tiny", "expert")
  config_base.add_training(everything, "public", seq_len=64)
  kw = dict(seq_len=64, per_device_batch=2, extrapolate=False, log=_quiet)
  e = plan(expert, "v5p:2x2x1", "train", **kw)
  p = plan(everything, "v5p:2x2x1", "train", **kw)
  assert e["stage"] == "expert" and p["stage"] == "public"
  assert e["model_flops"] == p["model_flops"]
  assert e["executed_flops_per_chip"] < 0.9 * p["executed_flops_per_chip"]
  assert e["executed_over_model"] < p["executed_over_model"]


@needs_libtpu
def test_eval_step_plan_multislice():
  from flexolmo_jax.aot import plan
  config = load_config("tiny", "moe4")
  config.mesh.data = 2
  r = plan(config, "v5p:2x2x1", "eval", seq_len=64, global_batch_size=8, num_slices=2,
           extrapolate=False, log=_quiet)
  assert r["chips"] == 8 and r["slices"] == 2 and r["mesh"]["data"] == 2
  assert r["fits"] and r["executed_flops_per_chip"] > 0


@needs_libtpu
def test_cli_exit_status():
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  base = [sys.executable, "-m", "flexolmo_jax.aot",
          f"--config={ROOT / 'configs' / 'tiny.py'}:expert",
          "--mode=eval", "--seq_len=64", "--extrapolate=false"]
  p = subprocess.run(base + ["--topology=v5p:2x2x1", "--hbm_gb=0.000001"], capture_output=True,
                     text=True, cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 1, p.stderr[-2000:]
  assert "DOES NOT FIT" in p.stdout and '"fits": false' in p.stdout
  p = subprocess.run(base + ["--topology=v9z:2x2"], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=300)
  assert p.returncode == 2 and "unknown TPU generation 'v9z'" in p.stderr


def test_compiler_oom_messages_parse():
  from flexolmo_jax.aot.planner import _parse_oom
  assert _parse_oom("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 120.5G of "
                    "95.74G hbm.") == (120.5 * 2 ** 30, 95.74 * 2 ** 30, "total")
  assert _parse_oom("the total memory required for HLO temporaries (2.31T) exceeds available "
                    "HBM (95.74G).") == (2.31 * 2 ** 40, 95.74 * 2 ** 30, "temporaries")
  assert _parse_oom("INTERNAL: something else") is None


def test_maxtext_model_flops_and_the_mixtral_anchor():
  """The formula against MaxText's published Mixtral numbers: MFU x peak / (tokens/s per chip)
  is 82.93 GFLOP per token on both v5p-256 and v6e-256 = ours with MaxText's attention term of
  the time (not halved); the causal halving removes exactly 3 x L x 2 T H h per token."""
  cfg = config_base.model_config(load_config("mixtral_8x7b"))
  per_token = flops.train_flops(cfg, 1, 4096, causal=False) / 4096
  assert per_token == pytest.approx(calibration.ANCHOR["gflop_per_token"] * 1e9, rel=1e-4)
  for mfu, peak, tokens in ((0.5256, 459e12, 2909), (0.3523, 918e12, 3899)):
    assert mfu * peak / tokens == pytest.approx(per_token, rel=1e-3)
  causal = flops.train_flops(cfg, 1, 4096) / 4096
  assert per_token - causal == pytest.approx(3 * 32 * 2 * 4096 * 32 * 128)
  # 6N: N = active matmul weights incl. the head (MaxText's "embedding" term), not the lookup.
  n_active = (32 * (4096 * (32 + 2 * 8) * 128 + 4096 * 32 * 128 + 2 * 3 * 4096 * 14336
                    + 4096 * 8) + 4096 * 32000)
  assert flops.weight_flops_per_token(cfg) == 2 * n_active
  assert flops.forward_flops(cfg, 2, 4096) * 3 == flops.train_flops(cfg, 2, 4096)


def test_calibration_reproduces_the_anchor():
  """A plan with the anchor's roofline gets MaxText's 54.89% back (in MaxText's convention of
  the time), and its step is the measured one."""
  cfg = config_base.model_config(load_config("mixtral_8x7b"))
  chips, batch, T = 128, 12 * 128, 4096
  roof_per_chip = 4000.0  # any roofline: the efficiency maps it onto the measurement
  result = {"roofline_step_s": batch * T / (roof_per_chip * chips), "peak_flops": 459e12,
            "chips": chips, "global_batch": batch, "seq_len": T,
            "model_flops": flops.train_flops(cfg, batch, T, causal=False)}
  eff = calibration.ANCHOR["tokens_per_s_per_chip"] / roof_per_chip
  c = calibration.calibrate(result, eff)
  assert c["calibrated_mfu"] == pytest.approx(calibration.ANCHOR["mfu"], rel=1e-3)
  assert c["calibrated_tokens_per_s"] / chips == pytest.approx(
      calibration.ANCHOR["tokens_per_s_per_chip"])
  # The stored constant, on its own anchor plan (compute-bound at its compute term).
  a = calibration.PLANNER_ANCHOR
  result["roofline_step_s"] = a["compute_step_s"]
  assert calibration.calibrate(result)["calibrated_mfu"] == pytest.approx(0.5489, rel=1e-3)
  assert a["compute_tokens_per_s_per_chip"] == pytest.approx(batch * T / chips
                                                             / a["compute_step_s"], rel=1e-4)
  plan = {"global_batch": batch, "seq_len": T, "chips": chips, "t_compute_s": a["compute_step_s"]}
  assert calibration.efficiency_of(plan) == pytest.approx(calibration.efficiency(), rel=1e-4)
  assert 0.5 < calibration.efficiency() < 1.0  # MaxText reached 73% of its compute roofline


def test_jaxpr_flops_scale_shard_map_pallas_and_ragged_dot():
  from jax.experimental import pallas as pl
  from jax.sharding import PartitionSpec as P
  M, K, N = 64, 32, 48
  x, w = jnp.ones((M, K)), jnp.ones((K, N))
  assert matmul_flops(jax.make_jaxpr(jnp.dot)(x, w)) == 2 * M * K * N
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  # A shard_map body is one shard's work: times the manual axes' size. Manual over both
  # axes, the b halves repeat the same product (each chip still does 1/8 of the count).
  for axes, copies in (({"a"}, 1), ({"a", "b"}, 2)):
    sharded = jax.shard_map(jnp.dot, mesh=mesh, in_specs=(P("a"), P()), out_specs=P("a"),
                            axis_names=axes)
    assert matmul_flops(jax.make_jaxpr(sharded)(x, w)) == copies * 2 * M * K * N

  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], w_ref[...])

  blocked = pl.pallas_call(kernel, grid=(4,), out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
                           in_specs=[pl.BlockSpec((M // 4, K), lambda i: (i, 0)),
                                     pl.BlockSpec((K, N), lambda i: (0, 0))],
                           out_specs=pl.BlockSpec((M // 4, N), lambda i: (i, 0)), interpret=True)
  d = matmul_flops_detail(jax.make_jaxpr(blocked)(x, w))
  assert d == {"total": 2 * M * K * N, "pallas": 2 * M * K * N, "dynamic_loops": 0}
  # A loop whose trip count is traced: counted once, and flagged.
  looped = lambda x, w, n: jax.lax.fori_loop(0, n, lambda i, a: a + x @ w, jnp.zeros((M, N)))
  d = matmul_flops_detail(jax.make_jaxpr(looped)(x, w, 3))
  assert d["total"] == 2 * M * K * N and d["dynamic_loops"] == 1
  # A grouped matmul and its two gradients: 3 x 2MKN, the weight gradient not G times over.
  G = 4
  loss = lambda x, w: jax.lax.ragged_dot(x, w, jnp.full((G,), M // G, jnp.int32)).sum()
  grads = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(x, jnp.ones((G, K, N)))
  assert matmul_flops(grads) == 3 * 2 * M * K * N


def test_chip_table_and_hlo_parsers():
  assert chip_for("v5p:4x4x4").hbm_bytes == 95e9
  assert chip_for("v6e:4x4").peak_flops == 918e12
  with pytest.raises(ValueError, match="unknown TPU generation"):
    chip_for("h100:8")
  hlo = "\n".join([
      "%fused_computation.1 (param_0: f32[2,4,64,64]) -> f32[2,4,64,64] {",
      "  %big = f32[8,4,64,64]{3,2,1,0} exponential(%param_0)",  # inside a fusion: no buffer
      "}",
      "ENTRY %main (p: f32[2,4,64,64]) -> f32[2,4,64,64] {",
      "  %p = f32[2,4,64,64]{3,2,1,0} parameter(0)",
      "  %f = f32[2,4,64,64]{3,2,1,0:T(8,128)} fusion(%p), kind=kLoop, calls=%fused_computation.1",
      # logits of a vocabulary of 512 over 2 shards, out of a matmul + reduction fusion
      "  %lg = (f32[2,64]{1,0}, f32[2,64,256]{2,1,0}) fusion(%x, %w), kind=kOutput, "
      "calls=%fused_computation.1",
      "  %cp = (f32[8,64,256]{2,1,0:T(8,128)S(1)}, u32[]) copy-start(%y)",  # not in HBM
      "  %w2 = f32[32,512]{1,0} add(%w, %w)",  # a [d / 2, V] weight (d = 64): not logits
      "  %lf = f32[512,256]{1,0} convert(%lg)",  # flattened [tokens, V / 2] logits
      "  %ag = bf16[64,1024]{1,0} all-gather(%p), replica_groups={{0,1,2,3}}, dimensions={0}",
      "  %rs = f32[16,1024]{1,0} reduce-scatter(%q), replica_groups=[1,4]<=[4], dimensions={0}",
      "  %ar-start = (f32[256]{0}, f32[256]{0}) all-reduce-start(%r), "
      "replica_groups=mesh['x'=2,'y'=4] {'y'}",
      "  %ar-done = f32[256]{0} all-reduce-done(%ar-start)",
      "  %ra = bf16[128,64]{1,0} ragged-all-to-all(%in, %out, %io, %ss, %oo, %rs), "
      "replica_groups={{0,1}}",
      "  ROOT %add = f32[256]{0} add(%a, %b)",
      "}",
  ])
  c = collective_bytes(hlo, 4)
  assert c["all-gather"] == 64 * 1024 * 2 * 3 / 4
  assert c["reduce-scatter"] == 16 * 1024 * 4 * 3
  assert c["all-reduce"] == 2 * 256 * 4 * 3 / 4
  assert c["ragged-all-to-all"] == 128 * 64 * 2 / 2 and c["all-to-all"] == 0
  assert c["total"] == (c["all-gather"] + c["reduce-scatter"] + c["all-reduce"]
                        + c["ragged-all-to-all"])
  b = largest_buffers(hlo, seq_len=64, vocab_dims={512, 256}, d_model=32)
  assert b == {"attention_scores": 2 * 4 * 64 * 64 * 4, "logits": 512 * 256 * 4}
  # T == d_model: a [L, B, T, d] remat stack is not scores; only what attention makes is.
  stack = ('ENTRY %m () -> f32[] {\n  %st = bf16[8,2,64,64]{3,2,1,0} dynamic-update-slice(%a, %b),'
           ' metadata={op_name="jit(step)/decoder/while/body/dynamic_update_slice"}\n'
           '  %sc = f32[2,4,64,64]{3,2,1,0} fusion(%q, %k), kind=kOutput, calls=%f, '
           'metadata={op_name="jit(step)/decoder/layers/self_attn/dot_general"}\n}')
  assert largest_buffers(stack, 64, {512}, d_model=64)["attention_scores"] == 2 * 4 * 64 * 64 * 4


@needs_libtpu
def test_mesh_axis_smaller_than_every_physical_axis():
  """tensor=2 on a v6e 8x8 slice splits a physical axis (jax.make_mesh alone refuses it);
  each tensor pair is made of ICI neighbours."""
  from flexolmo_jax.aot import planner as plan_mod
  devices = plan_mod.topology_devices("v6e:8x8")
  mesh = plan_mod.make_mesh({"fsdp": 32, "tensor": 2}, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "expert": 1, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  pair = mesh.devices[0, 0, 0, :]
  dist = sum(abs(a - b) for a, b in zip(pair[0].coords, pair[1].coords))
  assert dist == 1
