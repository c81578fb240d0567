"""Compile the real training or evaluation step for a TPU topology on this (CPU) host.

Memory: the compiled program itself (XLA's buffer assignment for one chip).
FLOPs: every matmul of the traced step (jaxpr_flops.py: backward and rematerialisation
included, scan bodies times their length), divided over the chips. XLA's own cost analysis
is not used for FLOPs: it counts a loop body once and its TPU FLOP attribution varies with
the sharding.
HBM and collective bytes: XLA's cost analysis and the HLO of fully unrolled 2- and 3-layer
variants of the same step, extrapolated to L layers: cost(L) = cost(2) + (L - 2) *
(cost(3) - cost(2)). (Not from 1 layer: unrolled, a single rematerialised layer gets its
recomputation merged away by CSE; from two layers on the cost is affine in L.)
Roofline step time: max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / ICI
bandwidth); MFU = model FLOPs (flops.py: 3 x forward for training) / (step x peak x chips).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Any

import jax

from flexolmo_jax import config_base
from flexolmo_jax.parallel.chips import Chip, chip_for
from flexolmo_jax.aot.hlo import collective_bytes
from flexolmo_jax.aot.jaxpr_flops import matmul_flops
from flexolmo_jax.model import abstract_params
from flexolmo_jax.model.flops import forward_flops, train_flops
from flexolmo_jax.parallel import make_mesh, param_shardings, rules_from_config

GB = 1e9
MODES = ("train", "eval")


class AotUnavailable(RuntimeError):
  """libtpu (the TPU compiler) is not installed."""


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str, num_slices: int = 1):
  """The devices of a TPU topology such as 'v5p:4x4x4' (times num_slices), no TPU needed."""
  if not libtpu_installed():
    raise AotUnavailable("libtpu is not installed; install the TPU compiler with "
                         "`pip install -e '.[tpu]'` (or `pip install \"jax[tpu]==0.10.2\"`)")
  # libtpu otherwise takes a machine-wide lock that any other JAX process may hold.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    extra = {"num_slices": num_slices} if num_slices > 1 else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **extra).devices
  except Exception as e:  # libtpu raises plain runtime errors for bad names
    raise ValueError(f"cannot make TPU topology {topology!r}: {e}") from e


@dataclasses.dataclass
class Shape:
  batch: int
  seq_len: int


def prepare_config(config, mode: str, n_devices: int, seq_len: int | None = None,
                   global_batch_size: int | None = None, per_device_batch: int | None = None):
  """A copy of `config` with a train block (stage defaults when missing) and the step shape."""
  config = config.copy_and_resolve_references()
  config.unlock()
  # Kernels follow the config's platform: compile exactly what a TPU run would execute.
  config.model.platform = "tpu"
  cfg = config_base.model_config(config)
  if "train" not in config:
    stage = "expert" if cfg.num_experts == 2 else ("router" if cfg.is_moe else "public")
    config_base.add_training(config, stage, seq_len=min(cfg.max_seq_len, 4096))
  if seq_len:
    config.train.seq_len = int(seq_len)
  if global_batch_size:
    batch = int(global_batch_size)
  elif per_device_batch:
    batch = int(per_device_batch) * n_devices
  elif mode == "train":
    batch = int(config.train.global_batch_size)
  else:
    batch = int(config.eval.global_batch_size)
  if mode == "train":
    config.train.global_batch_size = batch
  else:
    config.eval.global_batch_size = batch
  return config, Shape(batch, int(config.train.seq_len))


def _layer_variant(config, n_layers: int):
  c = config.copy_and_resolve_references()
  c.unlock()
  c.model.n_layers = n_layers
  c.model.scan_unroll = n_layers  # one loop iteration: XLA's cost analysis sees every layer
  return c


def _trace(config, mode: str, mesh, shape: Shape):
  """The jitted step of `mode`, traced on abstract, sharded inputs (nothing allocated)."""
  if mode == "train":
    from flexolmo_jax.train.trainer import setup_training
    setup = setup_training(config, mesh=mesh)
    state = setup.abstract_state()
    _, frozen = setup.abstract_trainable_frozen()
    return setup.jit_step().trace(state, frozen, setup.abstract_batch())
  from flexolmo_jax.evaluate import steps
  cfg = config_base.model_config(config)
  rules = rules_from_config(config.axis_rules)
  p_sh = param_shardings(cfg, mesh, rules)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params(cfg), p_sh)
  fn = steps.jit_step(steps.make_loss_fn(cfg, rules), p_sh, mesh, rules, shape.batch,
                      shape.seq_len)
  mask = (jax.ShapeDtypeStruct((shape.batch, cfg.num_experts), bool) if cfg.is_moe else None)
  return fn.trace(params, steps.abstract_batch(mesh, rules, shape.batch, shape.seq_len), mask)


def _compile(config, mode, mesh, shape, with_jaxpr: bool = False):
  with jax.set_mesh(mesh):
    traced = _trace(config, mode, mesh, shape)
    compiled = traced.lower().compile()
  return (compiled, traced.jaxpr) if with_jaxpr else compiled


_OOM = re.compile(r"Used ([0-9.]+)([GMK])? of ([0-9.]+)([GMK])? hbm", re.I)


def _parse_oom(message: str) -> tuple[float, float] | None:
  m = _OOM.search(message)
  if not m:
    return None
  unit = {"G": 2 ** 30, "M": 2 ** 20, "K": 2 ** 10, None: 1}
  return float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]


def _costs(compiled, n_devices: int) -> dict[str, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  coll = collective_bytes(compiled.as_text(), n_devices)
  return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
          "collective_bytes": coll["total"]}


def plan(config, topology: str, mode: str = "train", *, seq_len: int | None = None,
         global_batch_size: int | None = None, per_device_batch: int | None = None,
         hbm_gb: float | None = None, extrapolate: bool = True, num_slices: int = 1,
         log=print) -> dict[str, Any]:
  """Compile `mode`'s step of `config` for `topology`; return the plan (see module doc)."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} not in {MODES}")
  chip: Chip = chip_for(topology)
  devices = topology_devices(topology, num_slices)
  n = len(devices)
  config, shape = prepare_config(config, mode, n, seq_len, global_batch_size, per_device_batch)
  cfg = config_base.model_config(config)
  mesh = make_mesh(config.mesh.to_dict(), devices)
  hbm = hbm_gb * GB if hbm_gb else chip.hbm_bytes
  result: dict[str, Any] = {
      "topology": topology, "slices": num_slices, "chip": chip.name, "chips": n, "mode": mode,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "global_batch": shape.batch,
      "seq_len": shape.seq_len, "hbm_gb": hbm / GB, "remat": cfg.remat_policy,
      "dispatch": cfg.dispatch, "attention": cfg.attention,
  }
  log(f"compiling the {mode} step for {topology} ({n} x {chip.name}), mesh "
      f"{result['mesh']}, batch {shape.batch} x {shape.seq_len} ...")
  t0 = time.time()
  try:
    compiled, jaxpr = _compile(config, mode, mesh, shape, with_jaxpr=True)
  except Exception as e:  # the TPU compiler refuses programs that exceed HBM
    used = _parse_oom(str(e))
    if used is None:
      raise
    result.update(fits=False, total_gb=used[0] / GB, compiler_hbm_gb=used[1] / GB,
                  error=str(e).splitlines()[0][:500], compile_s=time.time() - t0)
    return result
  result["compile_s"] = time.time() - t0
  ma = compiled.memory_analysis()
  mem = {"arguments_gb": ma.argument_size_in_bytes / GB, "outputs_gb": ma.output_size_in_bytes / GB,
         "temporaries_gb": ma.temp_size_in_bytes / GB, "aliased_gb": ma.alias_size_in_bytes / GB,
         "code_gb": ma.generated_code_size_in_bytes / GB}
  total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
           + ma.generated_code_size_in_bytes - ma.alias_size_in_bytes)
  result.update(mem, total_gb=total / GB, fits=total <= hbm)

  model_flops = (train_flops if mode == "train" else forward_flops)(cfg, shape.batch,
                                                                    shape.seq_len)
  flops = matmul_flops(jaxpr) / n
  result.update(model_flops=model_flops, flops_per_chip=flops)
  if extrapolate:
    L = cfg.n_layers
    if L <= 3:
      log(f"compiling the {L} layers unrolled for HBM and collective bytes ...")
      costs = _costs(_compile(_layer_variant(config, L), mode, mesh, shape), n)
    else:
      log("compiling unrolled 2- and 3-layer variants for HBM and collective bytes ...")
      c2 = _costs(_compile(_layer_variant(config, 2), mode, mesh, shape), n)
      c3 = _costs(_compile(_layer_variant(config, 3), mode, mesh, shape), n)
      costs = {k: c2[k] + (L - 2) * (c3[k] - c2[k]) for k in c2}
  else:
    costs = _costs(compiled, n)
  t_compute = flops / chip.peak_flops
  t_hbm = costs["bytes"] / chip.hbm_bw
  t_ici = costs["collective_bytes"] / chip.ici_bw
  step = max(t_compute, t_hbm, t_ici)
  bound = ("compute", "HBM bandwidth", "ICI")[[t_compute, t_hbm, t_ici].index(step)]
  no_overlap = max(t_compute, t_hbm) + t_ici
  result.update(
      xla_flops_per_chip=costs["flops"], hbm_bytes_per_chip=costs["bytes"],
      collective_bytes_per_chip=costs["collective_bytes"],
      t_compute_s=t_compute, t_hbm_s=t_hbm, t_ici_s=t_ici, step_s=step, bound=bound,
      mfu=model_flops / (step * chip.peak_flops * n),
      mfu_no_overlap=model_flops / (no_overlap * chip.peak_flops * n),
      tokens_per_s=shape.batch * shape.seq_len / step)
  return result


def report(r: dict[str, Any]) -> str:
  lines = [f"{r['mode']} step on {r['topology']} ({r['chips']} x {r['chip']}), mesh {r['mesh']}, "
           f"batch {r['global_batch']} x {r['seq_len']}, remat {r['remat']}, "
           f"dispatch {r['dispatch']}"]
  if "arguments_gb" in r:
    lines.append(f"  per-chip memory: arguments {r['arguments_gb']:.2f} GB, temporaries "
                 f"{r['temporaries_gb']:.2f} GB, outputs {r['outputs_gb']:.2f} GB, aliased "
                 f"(donated) {r['aliased_gb']:.2f} GB, code {r['code_gb']:.3f} GB")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  lines.append(f"  total {r['total_gb']:.2f} GB of {r['hbm_gb']:.1f} GB HBM per chip: {verdict}")
  if "error" in r:
    lines.append(f"  compiler: {r['error']}")
  if "flops_per_chip" in r:
    lines.append(f"  matmul FLOPs per chip per step {r['flops_per_chip']:.3e} (the traced step, "
                 f"incl. backward and recomputation); model FLOPs {r['model_flops']:.3e} per "
                 f"step on all chips ({'6' if r['mode'] == 'train' else '2'}N + attention)")
    lines.append(f"  HBM traffic per chip {r['hbm_bytes_per_chip'] / GB:.1f} GB, collectives "
                 f"{r['collective_bytes_per_chip'] / GB:.2f} GB per chip (XLA, all layers)")
    lines.append(f"  roofline: compute {r['t_compute_s'] * 1e3:.1f} ms, HBM {r['t_hbm_s'] * 1e3:.1f} ms,"
                 f" ICI {r['t_ici_s'] * 1e3:.1f} ms -> step {r['step_s'] * 1e3:.1f} ms "
                 f"({r['bound']}-bound), {r['tokens_per_s']:,.0f} tokens/s")
    lines.append(f"  estimated MFU {100 * r['mfu']:.1f}% (roofline: an upper bound, collectives "
                 f"overlapped), {100 * r['mfu_no_overlap']:.1f}% if collectives are not overlapped")
  return "\n".join(lines)
