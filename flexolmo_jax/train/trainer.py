"""The training loop (one for every stage; the config says what trains).

  build mesh and shardings -> initial params for the stage -> split trainable/frozen ->
  resume from the latest complete checkpoint -> step, log, checkpoint -> export params
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from flexolmo_jax import config_base
from flexolmo_jax.storage import model_io
from flexolmo_jax.data import make_eval_loader, make_train_loader
from flexolmo_jax.model import abstract_params, param_logical_axes
from flexolmo_jax.model.flops import train_flops
from flexolmo_jax.parallel.chips import peak_flops_for
from flexolmo_jax.parallel import (activation_sharding, fit_spec, logical_shardings, make_mesh,
                                   rules_from_config)
from flexolmo_jax.storage import checkpoints as ckpt
from flexolmo_jax.storage import param_store
from flexolmo_jax.storage.paths import as_path
from flexolmo_jax.train.init import fingerprint, frozen_source, initial_params
from flexolmo_jax.train.metrics import MetricWriter
from flexolmo_jax.train.optim import make_optimizer
from flexolmo_jax.train.partition import config_partition, flatten, sliced_shape
from flexolmo_jax.evaluate import steps as eval_steps
from flexolmo_jax.train.step import init_state, make_step_fn

BATCH_KEYS = eval_steps.BATCH_KEYS
EXIT_PREEMPTED = 143
STEP_DELAY_ENV = "FLEXOLMO_TRAIN_STEP_DELAY"  # test hook: seconds to sleep per step (signals)


class TrainingError(RuntimeError):
  pass


class Preempted(SystemExit):
  def __init__(self):
    super().__init__(EXIT_PREEMPTED)


def _split_shardings(partition, full_shardings, shapes, mesh):
  flat_sh, flat_shape = flatten(full_shardings), flatten(shapes)
  t_sh, f_sh = {}, {}
  for key, rule in partition.rules:
    spec = flat_sh[key].spec
    if rule.trainable:
      t_sh[key] = NamedSharding(mesh, fit_spec(spec, sliced_shape(flat_shape[key].shape, rule, True), mesh))
    if not rule.trainable or (rule.slots is not None and rule.frozen_slots):
      f_sh[key] = NamedSharding(mesh, fit_spec(spec, sliced_shape(flat_shape[key].shape, rule, False), mesh))
  return t_sh, f_sh


def data_path(config, path) -> str:
  """Relative data paths resolve against config.data.root when the config has one."""
  root = config.data.get("root", "")
  path = str(path)
  if root and not epath.Path(path).is_absolute():  # gs://... is absolute
    return str(epath.Path(root) / path)
  return path


def _sources(config):
  out = []
  for item in config.data.sources:
    if isinstance(item, str):
      out.append((data_path(config, item), 1.0))
    else:
      out.append((data_path(config, item[0]), float(item[1])))
  if not out:
    raise TrainingError("config.data.sources is empty")
  return out


def _data_fingerprint(config) -> dict:
  tc = config.train
  return {"sources": _sources(config), "tokenizer": data_path(config, config.data.tokenizer),
          "seq_len": int(tc.seq_len), "global_batch_size": int(tc.global_batch_size),
          "seed": int(config.seed)}


def _peak_flops(tc):
  if tc.peak_flops_per_device:
    return float(tc.peak_flops_per_device)
  return peak_flops_for(jax.devices()[0].device_kind)


def evaluate(params, cfg, rules, config, mesh, batch_sh, expert_mask=None) -> dict[str, float]:
  """Mean token loss on each `config.eval.sources` validation split (exact over the split)."""
  results = {}
  if not config.eval.sources:
    return results
  fn = jax.jit(eval_steps.make_loss_fn(cfg, rules, routing=False))
  for name, path in config.eval.sources.items():
    loader = make_eval_loader(data_path(config, path), data_path(config, config.data.tokenizer),
                              int(config.train.seq_len),
                              int(config.eval.global_batch_size))
    results[name] = eval_steps.mean_loss(fn, params, loader, expert_mask, batch_sh)
  return results


@dataclasses.dataclass
class TrainingSetup:
  """Everything about a training run that follows from its config and mesh (no data, no I/O):
  what trains, every sharding, the optimizer and the jitted step. The AOT planner lowers the
  same step for a TPU topology."""
  config: Any
  cfg: Any  # what the step runs (router tuning: top-k = tuning_top_k)
  mesh: Any
  rules: Any
  partition: Any
  tx: Any
  schedule: Any
  param_shardings: Any
  trainable_shardings: dict
  frozen_shardings: dict
  batch_shardings: dict
  export_cfg: Any = None  # what is exported and evaluated (the config's model block)
  state_shardings: Any = None

  def abstract_trainable_frozen(self):
    shapes = flatten(abstract_params(self.cfg))
    t, f = {}, {}
    for key, rule in self.partition.rules:
      dt = shapes[key].dtype
      if key in self.trainable_shardings:
        t[key] = jax.ShapeDtypeStruct(sliced_shape(shapes[key].shape, rule, True), dt,
                                      sharding=self.trainable_shardings[key])
      if key in self.frozen_shardings:
        f[key] = jax.ShapeDtypeStruct(sliced_shape(shapes[key].shape, rule, False),
                                      self.partition.frozen_dtype(key, dt, self.cfg.dtype),
                                      sharding=self.frozen_shardings[key])
    return t, f

  def split_fn(self):
    """Full params -> (trainable, frozen) in their shardings; frozen matmul weights in the
    compute dtype (train/partition.py)."""
    split = lambda p: self.partition.split(p, compute_dtype=self.cfg.dtype)
    return jax.jit(split, out_shardings=(self.trainable_shardings, self.frozen_shardings))

  def abstract_batch(self):
    tc = self.config.train
    shape = (int(tc.global_batch_size), int(tc.seq_len))
    dtypes = {"input_ids": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=self.batch_shardings[k])
            for k in BATCH_KEYS}

  def init_state_fn(self):
    def init(t):
      state = init_state(t, self.tx)
      # Optimizer moments take their parameter's sharding (zeros would otherwise be
      # replicated on every device by the compiler's choice).
      state["opt_state"] = optax.tree_map_params(
          self.tx, jax.lax.with_sharding_constraint, state["opt_state"],
          self.trainable_shardings, transform_non_params=lambda x: x)
      return state
    return jax.jit(init, in_shardings=(self.trainable_shardings,))

  def abstract_state(self):
    """State ShapeDtypeStructs with the shardings the compiler picks for the optimizer state."""
    t, _ = self.abstract_trainable_frozen()
    compiled = self.init_state_fn().lower(t).compile()
    shapes = jax.eval_shape(lambda x: init_state(x, self.tx), t)
    self.state_shardings = compiled.output_shardings
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.state_shardings)

  def jit_step(self):
    if self.state_shardings is None:
      self.abstract_state()
    fn = make_step_fn(self.cfg, self.partition, self.tx, self.schedule, self.config.train,
                      self.rules)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.frozen_shardings,
                                     self.batch_shardings),
                   out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
                   donate_argnums=(0,))


def setup_training(config, mesh=None, devices=None) -> TrainingSetup:
  cfg = config_base.step_model_config(config)
  if not cfg.scan_layers:
    raise TrainingError("training needs model.scan_layers=True")
  tc = config.train
  rules = rules_from_config(config.axis_rules)
  mesh = mesh if mesh is not None else make_mesh(config.mesh.to_dict(), devices)
  shapes = abstract_params(cfg)
  full_sh = logical_shardings(param_logical_axes(cfg), shapes, mesh, rules)
  partition = config_partition(config, cfg)
  t_sh, f_sh = _split_shardings(partition, full_sh, shapes, mesh)
  B, T = int(tc.global_batch_size), int(tc.seq_len)
  batch_sh = {k: activation_sharding(mesh, ("act_batch", "act_length"), (B, T), rules)
              for k in BATCH_KEYS}
  tx, schedule = make_optimizer(tc)
  return TrainingSetup(config, cfg, mesh, rules, partition, tx, schedule, full_sh, t_sh, f_sh,
                       batch_sh, export_cfg=config_base.model_config(config))


def train(config, workdir, devices=None) -> dict:
  """Runs (or resumes) training in `workdir`; returns a summary dict.

  devices: the devices of the mesh (default: all); tests pass a subset to compare layouts.
  """
  workdir = as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  setup = setup_training(config, devices=devices)
  cfg, mesh, rules, partition = setup.cfg, setup.mesh, setup.rules, setup.partition
  tc = config.train
  B, T = int(tc.global_batch_size), int(tc.seq_len)
  full_sh, t_sh, f_sh = setup.param_shardings, setup.trainable_shardings, setup.frozen_shardings
  batch_sh = setup.batch_shardings

  with jax.set_mesh(mesh):
    params, provenance = initial_params(config, cfg, full_sh, jax.random.key(int(config.seed)),
                                        mesh, rules)
    trainable, frozen = setup.split_fn()(params)
    source_dtypes = {k: v.dtype for k, v in flatten(params).items()}
    frozen_cast = any(frozen[k].dtype != source_dtypes[k] for k in frozen)
    del params
    step_fn = setup.jit_step()
    state = setup.init_state_fn()(trainable)
    state_sh = setup.state_shardings
    meta = {"stage": config.stage, "model": cfg.to_dict(), "init": provenance,
            "init_fingerprint": fingerprint(provenance), "data": _data_fingerprint(config),
            "trainable": partition.describe(),
            "bias_parametrization": partition.bias_parametrization}
    source = frozen_source(config)
    if source and f_sh:
      # Frozen leaves are rebuilt from `source` at every start, never checkpointed: a source
      # overwritten in place (same path and meta.json) would silently change the frozen half
      # of a resumed run. Its content digest goes in the checkpoint and is compared on resume.
      source_cfg = model_io.read_config(source)
      meta["frozen_sha256"] = param_store.content_digest(source, moe=source_cfg.is_moe)

    manager = ckpt.make_manager(workdir, config.checkpoint.every, config.checkpoint.keep,
                                config.checkpoint.async_save)

    def check_meta(step, saved_meta):
      if "frozen_sha256" in meta and "frozen_sha256" in saved_meta:  # older ones have none
        diff = param_store.first_digest_difference(saved_meta["frozen_sha256"],
                                                   meta["frozen_sha256"])
        if diff is not None:
          raise TrainingError(
              f"the frozen source {source} changed since {workdir} checkpointed step {step}: "
              f"tensor {diff} has sha256 "
              f"{(meta['frozen_sha256'].get(diff) or 'none')[:16]}..., the checkpoint was made "
              f"with {(saved_meta['frozen_sha256'].get(diff) or 'none')[:16]}... Resuming would "
              f"train against a different frozen model: restore the source or use a new "
              f"--workdir.")
      # The bias leaf of a checkpoint is theta under "softplus", b itself under "min";
      # checkpoints from before the choice existed hold b.
      saved_bias = saved_meta.get("bias_parametrization", "min")
      if cfg.expert_bias and saved_bias != meta["bias_parametrization"]:
        raise TrainingError(
            f"{workdir} holds a checkpoint (step {step}) whose expert bias trains as "
            f"{saved_bias!r}, but train.bias_parametrization is "
            f"{meta['bias_parametrization']!r}: resume with "
            f"--config.train.bias_parametrization={saved_bias}, or use a new --workdir.")
      for key in ("init_fingerprint", "data", "stage"):
        if saved_meta.get(key) != json.loads(json.dumps(meta[key])):
          raise TrainingError(
              f"{workdir} holds a checkpoint (step {step}) made with a different {key}: "
              f"saved {saved_meta.get(key)!r}, now {meta[key]!r}. Use a new --workdir.")

    try:
      resumed = ckpt.restore_latest(manager, ckpt.abstract_like(state), check_meta)
    except ckpt.NoRestorableCheckpoint as e:
      raise TrainingError(str(e)) from e
    if resumed is not None:
      state = resumed[1]
      logging.info("resumed from step %d", resumed[0])
    start = int(jax.device_get(state["step"]))

    writer = MetricWriter(workdir, int(tc.steps), start)
    if start == 0:
      writer.message(f"stage {config.stage}: training {', '.join(partition.describe())}")
    else:
      writer.message(f"resumed from step {start} ({workdir / 'checkpoints'})")
    preempt = ckpt.PreemptionFlag().install()
    flops = train_flops(cfg, B, T)
    peak = _peak_flops(tc)
    n_dev = mesh.devices.size
    loader = make_train_loader(_sources(config), data_path(config, config.data.tokenizer), T, B,
                               int(config.seed), start_step=start,
                               num_threads=int(config.data.num_threads))
    batches = iter(loader)
    step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    t0, last_logged, last_metrics = time.perf_counter(), start, {}
    try:
      for step in range(start, int(tc.steps)):
        batch = eval_steps.global_batch(next(batches), batch_sh)
        state, metrics = step_fn(state, frozen, batch)
        done = step + 1
        log_now = done % int(tc.log_every) == 0 or done == int(tc.steps)
        if step_delay:
          time.sleep(step_delay)
        stop = ckpt.preemption_agreed(preempt, manager, done,
                                      int(config.checkpoint.preemption_check_every))
        save_now = manager.should_save(done) or done == int(tc.steps) or stop
        if log_now or save_now:
          m = jax.device_get(metrics)
          skipped = int(jax.device_get(state["skipped"]))
          if skipped or not bool(m["finite"]):
            manager.wait_until_finished()
            raise TrainingError(
                f"non-finite loss or gradient at or before step {done} (loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])}); stopped without saving. The last good "
                f"checkpoint is step {manager.latest_step()} in {workdir / 'checkpoints'}.")
          if log_now:
            dt = time.perf_counter() - t0
            steps_done = done - last_logged
            scalars = {k: float(m[k]) for k in ("loss", "ce", "router_z_loss", "output_z_loss",
                                                "load_balance_loss", "grad_norm", "lr")}
            scalars["tokens_per_s"] = steps_done * B * T / dt
            if peak:
              scalars["mfu"] = steps_done * flops / dt / (peak * n_dev)
            if cfg.is_moe:
              for i, name in enumerate(cfg.names):
                scalars[f"router_prob/{name}"] = float(m["expert_prob"][i])
                scalars[f"router_share/{name}"] = float(m["expert_fraction"][i])
              scalars["dropped_assignments"] = float(m["dropped"])
            writer.scalars(done, {f"train/{k}": v for k, v in scalars.items()})
            writer.progress(done, {"loss": scalars["loss"], "tok/s": round(scalars["tokens_per_s"])})
            last_metrics = scalars
            t0, last_logged = time.perf_counter(), done
          if save_now:
            ckpt.save(manager, done, state, meta, force=True)
        if stop:
          manager.wait_until_finished()
          writer.message(f"preempted: saved step {done}; rerun the same command to resume")
          if jax.process_count() > 1:  # every host says which step it saved (the same one)
            logging.warning("process %d preempted: saved step %d", jax.process_index(), done)
          raise Preempted()
      manager.wait_until_finished()
    finally:
      preempt.uninstall()
      writer.close()

    final_step = int(jax.device_get(state["step"]))
    if frozen_cast:
      # The device copy of the frozen half is in the compute dtype; the export carries the
      # exact source values (bitwise, as the stitcher checks), rebuilt once more.
      del frozen
      source_params, _ = initial_params(config, cfg, full_sh, jax.random.key(int(config.seed)),
                                        mesh, rules)
      _, frozen = jax.jit(partition.split, out_shardings=(t_sh, f_sh))(source_params)
      del source_params
    params = jax.jit(partition.merge)(state["params"], frozen)
    export_dir = workdir / "export"
    export_meta = {"stage": config.stage, "step": final_step, "init": provenance,
                   "workdir": str(workdir)}
    if config.export and (not model_io.is_model_dir(export_dir)
                          or model_io.read_meta(export_dir).get("step") != final_step):
      model_io.save_model_dir(export_dir, params, setup.export_cfg, export_meta, overwrite=True)
    eval_results = evaluate(params, setup.export_cfg, rules, config, mesh, {
        k: activation_sharding(mesh, ("act_batch", "act_length"),
                               (int(config.eval.global_batch_size), T), rules)
        for k in BATCH_KEYS}) if config.eval.get("at_end", True) else {}
    summary = {"step": final_step, "workdir": str(workdir), "train": last_metrics,
               "eval_loss": eval_results}
    if jax.process_index() == 0:
      (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
