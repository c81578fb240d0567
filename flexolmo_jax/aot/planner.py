"""Compile the real training or evaluation step (or decoding) for a TPU topology on this
(CPU) host.

What a plan reports, per chip unless said otherwise:
- Memory: XLA's buffer assignment of the compiled program (arguments, temporaries, outputs,
  aliased = donated inputs reused for outputs, code); the largest attention-score-shaped and
  logits-shaped temporaries are read off the HLO (hlo.py, a heuristic attribution).
- Executed FLOPs, two counts of what the compiled step does (remat and backward included):
  `executed_flops_per_chip`, the traced step's matmuls (jaxpr_flops.py: exact for XLA ops,
  scan bodies times their length, Pallas kernels per grid step), and `xla_flops_per_chip`,
  XLA's own cost analysis (all ops, fused; it skips Pallas kernels without a cost estimate).
- Model FLOPs: MaxText's definition (model/flops.py: 6N + causal attention for training,
  2N + attention for evaluation, frozen weights counted as trained), and executed / model.
- HBM and collective bytes (by kind: all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute): XLA's cost analysis and the HLO of fully unrolled 2- and 3-layer
  variants of the same step, extrapolated to L layers: cost(L) = cost(2) + (L - 2) *
  (cost(3) - cost(2)). (Not from 1 layer: unrolled, a single rematerialised layer gets its
  recomputation merged away by CSE; from two layers on the cost is affine in L.) XLA's
  FLOP count is extrapolated the same way (it counts a loop body once).
- Roofline step: max(executed FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes /
  ICI bandwidth), a lower bound on the step time. Model FLOPs over it would be an upper
  bound on MFU, not a prediction; the MFU this planner prints is calibrated on a measured
  anchor instead (calibration.py: MaxText's Mixtral-8x7B on v5p-128).
Decode mode (aot/decode.py): the decode step (one token per row, a KV cache of `seq_len` slots
per row, batch `global_batch_size`, default 32) and the whole generate program (prefill of
`prompt_len` tokens, default seq_len / 2, then the loop) compiled with the config's mesh and
rules; memory is the generate program's (its peak), `step_*` the step's, and it fits when
both do. FLOPs, HBM and collective bytes and the roofline are per decode step (model FLOPs:
2N + attention over every slot, per row); no MFU (the anchor is a training run).
A program that does not fit HBM still gets its FLOPs (from the trace) and the compiler's own
count of what it would need. When the unrolled variants do not fit either, their costs come
from per-chip batches 1 and 2, extrapolated (affinely) to the real batch, as the layers are
(`costs_from`); when even those do not fit, the roofline is compute-only. (The compiler's HBM
limit can only be lowered, not lifted: `xla_tpu_max_hbm_size_mib` above the chip is ignored.)
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
from flexolmo_jax.aot import calibration
from flexolmo_jax.aot.hlo import KINDS, collective_bytes, largest_buffers
from flexolmo_jax.aot.jaxpr_flops import matmul_flops_detail
from flexolmo_jax.model import abstract_params
from flexolmo_jax.model.flops import model_flops
from flexolmo_jax.parallel import make_mesh, param_shardings, rules_from_config

GB = 1e9
DECODE_BATCH = 32  # sequences decoded together when the plan does not say
MODES = ("train", "eval", "decode")


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
  elif mode == "decode":
    batch = DECODE_BATCH
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
  if mode == "decode":
    from flexolmo_jax.aot import decode
    return decode.trace_step(config, mesh, shape.batch, shape.seq_len)
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


def _compile_traced(traced):
  return traced.lower().compile()


def _compile(config, mode, mesh, shape):
  with jax.set_mesh(mesh):
    return _compile_traced(_trace(config, mode, mesh, shape))


def _with_batch(config, mode: str, batch: int):
  c = config.copy_and_resolve_references()
  c.unlock()
  (c.train if mode == "train" else c.eval).global_batch_size = batch
  return c, Shape(batch, int(c.train.seq_len))


# The TPU compiler's out-of-memory messages (two spellings seen in libtpu 0.0.4x).
_OOM = (re.compile(r"Used ([0-9.]+)([TGMK])? of ([0-9.]+)([TGMK])? hbm", re.I),
        re.compile(r"memory required for HLO temporaries \(([0-9.]+)([TGMK])?\) exceeds "
                   r"available HBM \(([0-9.]+)([TGMK])?\)", re.I))
_UNIT = {"T": 2 ** 40, "G": 2 ** 30, "M": 2 ** 20, "K": 2 ** 10, None: 1}


def _parse_oom(message: str) -> tuple[float, float, str] | None:
  """(bytes needed, bytes available, what was counted) from a compiler OOM, or None."""
  for what, pattern in zip(("total", "temporaries"), _OOM):
    m = pattern.search(message)
    if m:
      return (float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)],
              what)
  return None


def _try_compile(fn):
  """(compiled, None), or (None, parsed OOM) when the program does not fit HBM."""
  try:
    return fn(), None
  except Exception as e:  # the TPU compiler refuses programs that exceed HBM
    oom = _parse_oom(str(e))
    if oom is None:
      raise
    return None, (oom, str(e).splitlines()[0][:500])


def _costs(compiled, n_devices: int) -> dict[str, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  coll = collective_bytes(compiled.as_text(), n_devices)
  return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
          **{f"coll:{k}": coll[k] for k in (*KINDS, "total")}}


def _vocab_dims(vocab: int, mesh) -> set[int]:
  """V over every product of mesh axis sizes: the per-chip vocab sizes a sharding can give."""
  counts = {1}
  for size in mesh.shape.values():
    counts |= {c * size for c in counts}
  return {vocab // c for c in counts if vocab % c == 0}


def _memory(compiled) -> dict[str, float]:
  ma = compiled.memory_analysis()
  total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
           + ma.generated_code_size_in_bytes - ma.alias_size_in_bytes)
  return {"arguments_gb": ma.argument_size_in_bytes / GB,
          "outputs_gb": ma.output_size_in_bytes / GB,
          "temporaries_gb": ma.temp_size_in_bytes / GB, "aliased_gb": ma.alias_size_in_bytes / GB,
          "code_gb": ma.generated_code_size_in_bytes / GB, "total_gb": total / GB}


def _layer_costs(config, mode, mesh, shape, n, log):
  """Costs of all L layers from unrolled variants (module doc); None if one does not fit."""
  L = config_base.model_config(config).n_layers
  depths = (L,) if L <= 3 else (2, 3)
  log(f"compiling unrolled {' and '.join(map(str, depths))}-layer variant(s) at batch "
      f"{shape.batch} for HBM and collective bytes ...")
  costs = []
  for depth in depths:
    compiled, _ = _try_compile(lambda: _compile(_layer_variant(config, depth), mode, mesh,
                                                shape))
    if compiled is None:
      log(f"  the {depth}-layer variant at batch {shape.batch} does not fit HBM")
      return None
    costs.append(_costs(compiled, n))
    del compiled
  if len(costs) == 1:
    return costs[0]
  c2, c3 = costs
  return {k: c2[k] + (L - 2) * (c3[k] - c2[k]) for k in c2}


def _extrapolated_costs(config, mode, mesh, shape, n, log):
  """(costs of the whole step, how they were obtained) or (None, why not)."""
  costs = _layer_costs(config, mode, mesh, shape, n, log)
  if costs is not None:
    return costs, "layers"
  per_chip = shape.batch / n
  if per_chip < 3 or shape.batch % n:
    return None, "the unrolled variants do not fit HBM"
  # Per-chip batches 1 and 2, then affine in the batch as in the layers: weight gathers and
  # gradient reductions are per step, activation work and traffic per sequence.
  small = []
  for b in (1, 2):
    c, sh = _with_batch(config, mode, b * n)
    small.append(_layer_costs(c, mode, mesh, sh, n, log))
  if any(c is None for c in small):
    return None, "the unrolled variants do not fit HBM, even at 1-2 sequences per chip"
  c1, c2 = small
  return {k: c1[k] + (per_chip - 1) * (c2[k] - c1[k]) for k in c1}, "layers and batch"


def plan(config, topology: str, mode: str = "train", *, seq_len: int | None = None,
         global_batch_size: int | None = None, per_device_batch: int | None = None,
         hbm_gb: float | None = None, extrapolate: bool = True, num_slices: int = 1,
         prompt_len: int | None = None, log=print) -> dict[str, Any]:
  """Compile `mode`'s step of `config` for `topology`; return the plan (see module doc).

  prompt_len: decode mode's prefill length (default seq_len // 2)."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} not in {MODES}")
  chip: Chip = chip_for(topology)
  devices = topology_devices(topology, num_slices)
  n = len(devices)
  config, shape = prepare_config(config, mode, n, seq_len, global_batch_size, per_device_batch)
  # what the step runs (router tuning: every expert active)
  cfg = (config_base.step_model_config if mode == "train" else config_base.model_config)(config)
  mesh = make_mesh(config.mesh.to_dict(), devices)
  hbm = hbm_gb * GB if hbm_gb else chip.hbm_bytes
  result: dict[str, Any] = {
      "topology": topology, "slices": num_slices, "chip": chip.name, "chips": n, "mode": mode,
      "stage": config.get("stage") if mode == "train" else None,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "global_batch": shape.batch,
      "seq_len": shape.seq_len, "n_layers": cfg.n_layers, "hbm_gb": hbm / GB,
      "peak_flops": chip.peak_flops, "remat": cfg.remat_policy, "dispatch": cfg.dispatch,
      "attention": cfg.attention, "logits_chunk": cfg.logits_chunk,
  }
  if mode == "decode":
    return _plan_decode(config, cfg, chip, mesh, shape, result, prompt_len, hbm, extrapolate,
                        log)
  log(f"compiling the {mode} step for {topology} ({n} x {chip.name}), mesh "
      f"{result['mesh']}, batch {shape.batch} x {shape.seq_len} ...")
  t0 = time.time()
  with jax.set_mesh(mesh):
    traced = _trace(config, mode, mesh, shape)
    # Executed matmuls come from the trace, so they exist even when the program cannot fit.
    executed = matmul_flops_detail(traced.jaxpr)
    compiled, oom = _try_compile(lambda: _compile_traced(traced))
  del traced
  result["compile_s"] = time.time() - t0
  if compiled is None:
    (needed, available, what), message = oom
    # The compiler's count: of the whole program ("Used X of Y") or of its temporaries alone.
    result.update(fits=False, total_gb=needed / GB, compiler_hbm_gb=available / GB,
                  compiler_counted=what, error=message)
    if what == "temporaries":
      result["temporaries_gb"] = needed / GB
  else:
    result.update(_memory(compiled))
    result["fits"] = result["total_gb"] * GB <= hbm
    buffers = largest_buffers(compiled.as_text(), shape.seq_len,
                              _vocab_dims(cfg.vocab_size, mesh), cfg.d_model)
    result.update(largest_scores_gb=buffers["attention_scores"] / GB,
                  largest_logits_gb=buffers["logits"] / GB)

  model = model_flops(cfg, shape.batch, shape.seq_len, mode)
  step = _roofline(result, config, mode, mesh, shape, chip, n, executed, model, compiled,
                   extrapolate, log)
  del compiled
  result.update(
      roofline_tokens_per_s=shape.batch * shape.seq_len / step,
      # An upper bound (module doc); kept for the calibration, never printed as an MFU.
      roofline_mfu_bound=model / (step * chip.peak_flops * n))
  result.update(calibration.calibrate(result))
  return result


def _plan_decode(config, cfg, chip: Chip, mesh, shape: Shape, result, prompt_len, hbm,
                 extrapolate, log):
  """plan() for mode 'decode' (module doc)."""
  from flexolmo_jax.aot import decode
  from flexolmo_jax.model.flops import forward_flops_per_token
  n = result["chips"]
  prompt_len = int(prompt_len or shape.seq_len // 2)
  result.update(prompt_len=prompt_len, new_tokens=shape.seq_len - prompt_len,
                cache_gb_per_chip=decode.cache_bytes_per_chip(config, mesh, shape.batch,
                                                              shape.seq_len) / GB)
  t0 = time.time()
  log(f"compiling one decode step for {result['topology']} ({n} x {chip.name}), mesh "
      f"{result['mesh']}, batch {shape.batch}, cache {shape.seq_len} slots ...")
  with jax.set_mesh(mesh):
    traced = decode.trace_step(config, mesh, shape.batch, shape.seq_len)
    executed = matmul_flops_detail(traced.jaxpr)
    step, step_oom = _try_compile(lambda: _compile_traced(traced))
    del traced
    log(f"compiling the generate program (prefill {prompt_len} tokens, decode to "
        f"{shape.seq_len}) ...")
    program, oom = _try_compile(lambda: _compile_traced(
        decode.trace_generate(config, mesh, shape.batch, shape.seq_len, prompt_len)))
  result["compile_s"] = time.time() - t0
  if step is None:
    (needed, _, _), message = step_oom
    result.update(step_fits=False, step_total_gb=needed / GB, step_error=message)
  else:
    result.update({f"step_{k}": v for k, v in _memory(step).items()})
    result["step_fits"] = result["step_total_gb"] * GB <= hbm
  if program is None:
    (needed, available, what), message = oom
    result.update(program_fits=False, total_gb=needed / GB, compiler_hbm_gb=available / GB,
                  compiler_counted=what, error=message)
  else:
    result.update(_memory(program))
    result["program_fits"] = result["total_gb"] * GB <= hbm
  del program
  result["fits"] = result["step_fits"] and result["program_fits"]

  # Per decode step: every row's token runs the weights and attends to all cached slots.
  model = shape.batch * forward_flops_per_token(cfg, shape.seq_len, causal=False)
  t = _roofline(result, config, "decode", mesh, shape, chip, n, executed, model, step,
                extrapolate, log)
  del step
  result.update(roofline_tokens_per_s=shape.batch / t, calibrated_step_s=None,
                calibrated_mfu=None)
  return result


def _roofline(result, config, mode, mesh, shape: Shape, chip: Chip, n, executed, model,
              compiled, extrapolate, log) -> float:
  """FLOP counts, XLA's bytes / collectives and the roofline times into `result`; returns
  the roofline step time (a lower bound). `compiled` None: the step did not fit."""
  result.update(
      model_flops=model, model_flops_per_chip=model / n,
      executed_flops_per_chip=executed["total"] / n,
      pallas_flops_per_chip=executed["pallas"] / n,
      dynamic_loops=int(executed["dynamic_loops"]),
      executed_over_model=executed["total"] / model)
  if extrapolate:
    costs, costs_from = _extrapolated_costs(config, mode, mesh, shape, n, log)
  elif compiled is not None:
    costs, costs_from = _costs(compiled, n), "the compiled step (loop bodies once)"
  else:
    costs, costs_from = None, "the step does not fit HBM"
  times = {"compute": result["executed_flops_per_chip"] / chip.peak_flops}
  result["costs_from"] = costs_from
  if costs is not None:
    result.update(
        xla_flops_per_chip=costs["flops"], xla_flops_extrapolated=extrapolate,
        hbm_bytes_per_chip=costs["bytes"],
        collectives_per_chip={k: costs[f"coll:{k}"] for k in (*KINDS, "total")},
        collective_bytes_per_chip=costs["coll:total"])
    times["HBM bandwidth"] = costs["bytes"] / chip.hbm_bw
    times["ICI"] = costs["coll:total"] / chip.ici_bw
  step = max(times.values())
  result.update(
      t_compute_s=times["compute"], t_hbm_s=times.get("HBM bandwidth"), t_ici_s=times.get("ICI"),
      roofline_step_s=step, bound=max(times, key=times.get), roofline_complete=costs is not None)
  return step


def _report_decode(r: dict[str, Any]) -> str:
  lines = [f"decode on {r['topology']} ({r['chips']} x {r['chip']}), mesh {r['mesh']}, batch "
           f"{r['global_batch']}, context {r['seq_len']} (prefill {r['prompt_len']} + "
           f"{r['new_tokens']} new), {r['n_layers']} layers, dispatch {r['dispatch']} (decode "
           f"steps: capacity)"]
  lines.append(f"  KV cache per chip {_gb(r['cache_gb_per_chip'])}")
  if "step_arguments_gb" in r:
    lines.append(f"  decode step per chip: arguments {_gb(r['step_arguments_gb'])} (params in "
                 f"the decode dtypes + cache), temporaries {_gb(r['step_temporaries_gb'])}, "
                 f"aliased (donated cache) {_gb(r['step_aliased_gb'])}: total "
                 f"{_gb(r['step_total_gb'])}")
  else:
    lines.append(f"  decode step: {r.get('step_error', '')}")
  if "arguments_gb" in r:
    lines.append(f"  generate program per chip: arguments {_gb(r['arguments_gb'])}, "
                 f"temporaries {_gb(r['temporaries_gb'])}, outputs {_gb(r['outputs_gb'])}")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  lines.append(f"  total {_gb(r['total_gb'])} (generate program; step "
               f"{_gb(r['step_total_gb'])}) of {r['hbm_gb']:.1f} GB HBM per chip: {verdict}")
  if "error" in r:
    lines.append(f"  compiler: {r['error']}")
  lines.append(f"  FLOPs per chip per decode step: executed {r['executed_flops_per_chip']:.3e}, "
               f"model {r['model_flops_per_chip']:.3e} (2N + attention over every slot); "
               f"executed / model {r['executed_over_model']:.2f}")
  if r["roofline_complete"]:
    lines.append(f"  per decode step: HBM traffic {_gb(r['hbm_bytes_per_chip'] / GB)}, "
                 f"collectives {_gb(r['collective_bytes_per_chip'] / GB)} per chip")
    lines.append(f"  roofline (a lower bound): compute {r['t_compute_s'] * 1e3:.2f} ms, HBM "
                 f"{r['t_hbm_s'] * 1e3:.2f} ms, ICI {r['t_ici_s'] * 1e3:.2f} ms -> "
                 f"{r['roofline_step_s'] * 1e3:.2f} ms per step ({r['bound']}-bound), at most "
                 f"{r['roofline_tokens_per_s']:.0f} tokens/s")
  else:
    lines.append(f"  roofline (compute only: {r['costs_from']}): "
                 f"{r['roofline_step_s'] * 1e3:.2f} ms per step")
  return "\n".join(lines)


def _gb(x: float) -> str:
  return f"{x:.3g} GB"


def report(r: dict[str, Any]) -> str:
  if r["mode"] == "decode":
    return _report_decode(r)
  lines = [f"{r['mode']} step on {r['topology']} ({r['chips']} x {r['chip']}), mesh {r['mesh']}, "
           f"batch {r['global_batch']} x {r['seq_len']}, {r['n_layers']} layers, remat "
           f"{r['remat']}, dispatch {r['dispatch']}, attention {r['attention']}, logits_chunk "
           f"{r['logits_chunk']}" + (f", stage {r['stage']}" if r.get("stage") else "")]
  if "arguments_gb" in r:
    lines.append(f"  per-chip memory: arguments {_gb(r['arguments_gb'])}, temporaries "
                 f"{_gb(r['temporaries_gb'])}, outputs {_gb(r['outputs_gb'])}, aliased "
                 f"(donated) {_gb(r['aliased_gb'])}, code {_gb(r['code_gb'])}")
    lines.append(f"  largest single temporaries (by HLO shape): attention scores "
                 f"{_gb(r['largest_scores_gb'])}, logits {_gb(r['largest_logits_gb'])}")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  what = " (the compiler's count of the temporaries alone)" if r.get("compiler_counted") == \
      "temporaries" else ""
  lines.append(f"  total {_gb(r['total_gb'])}{what} of {r['hbm_gb']:.1f} GB HBM per chip: "
               f"{verdict}")
  if "error" in r:
    lines.append(f"  compiler: {r['error']}")
  convention = "6N + causal attention" if r["mode"] == "train" else "2N + causal attention"
  lines.append(f"  FLOPs per chip per step: executed {r['executed_flops_per_chip']:.3e} (traced "
               f"matmuls, remat and backward included; {r['pallas_flops_per_chip']:.2e} in "
               f"Pallas kernels), model {r['model_flops_per_chip']:.3e} (MaxText: "
               f"{convention}); executed / model {r['executed_over_model']:.2f}")
  if r.get("dynamic_loops"):
    lines.append(f"  (executed is a lower bound: {r['dynamic_loops']} while loops with traced trip "
                 "counts, e.g. chunked attention's, are counted once)")
  if r["roofline_complete"]:
    how = (f"extrapolated over {r['costs_from']} from unrolled variants"
           if r["xla_flops_extrapolated"] else "loop bodies counted once")
    lines.append(f"  XLA cost analysis: {r['xla_flops_per_chip']:.3e} FLOPs per chip ({how}), "
                 f"HBM traffic {_gb(r['hbm_bytes_per_chip'] / GB)}")
    c = r["collectives_per_chip"]
    kinds = ", ".join(f"{k} {_gb(c[k] / GB)}" for k in KINDS if c[k])
    lines.append(f"  collectives per chip per step {_gb(c['total'] / GB)}"
                 + (f": {kinds}" if kinds else ""))
    lines.append(f"  roofline (a lower bound): compute {r['t_compute_s'] * 1e3:.1f} ms, HBM "
                 f"{r['t_hbm_s'] * 1e3:.1f} ms, ICI {r['t_ici_s'] * 1e3:.1f} ms -> "
                 f"{r['roofline_step_s'] * 1e3:.1f} ms ({r['bound']}-bound)")
  else:
    lines.append(f"  roofline (a lower bound, compute only: {r['costs_from']}): "
                 f"{r['roofline_step_s'] * 1e3:.1f} ms")
  if r.get("calibrated_mfu") is not None:
    a = calibration.ANCHOR
    partial = "" if r["roofline_complete"] else ", from the compute-only roofline"
    lines.append(f"  estimated MFU {100 * r['calibrated_mfu']:.1f}% (step "
                 f"{r['calibrated_step_s'] * 1e3:.0f} ms{partial}): the roofline step / "
                 f"{r['efficiency']:.3f}, an efficiency calibrated on ONE anchor, {a['name']} "
                 f"at {100 * a['mfu']:.1f}% measured (52.6% on v5p-256, 35.2% on v6e-256)")
  else:
    lines.append("  no MFU estimate: the planner's anchor (aot/calibration.py) is not set")
  return "\n".join(lines)
