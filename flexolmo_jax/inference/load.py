"""`flexolmo_jax.load`: one call from a path on disk to logits, with expert opt-out.

Accepts a stitched model directory, a training workdir (its export) and an imported HF model
directory (`python -m flexolmo_jax.convert from_hf`). Excluding experts by name uses the
run-time mask (the router gives them logit -inf), which is exactly removing them because
FlexOlmo does not renormalise the top-k weights (FLEXOLMO.md section 1.5).

`load(path, mesh=...)` restores every parameter straight into its NamedSharding on that mesh
(the config's logical axis rules; orbax reads each host's shards only, so no host holds the
whole model), and `Model.logits` / `Model.generate` then run sharded with explicit shardings.
"""
from __future__ import annotations

import functools
import json

from typing import Sequence

import numpy as np

from flexolmo_jax.storage.paths import as_path


@functools.lru_cache(maxsize=16)
def _forward(cfg):
  """One jitted forward per config (models loaded twice, e.g. with other exclusions, share it)."""
  import jax
  from flexolmo_jax.model import FlexOlmo
  model = FlexOlmo(cfg)
  return jax.jit(lambda p, i, m: model.apply({"params": p}, i, expert_mask=m)[0])


@functools.lru_cache(maxsize=16)
def _sharded_forward(cfg, mesh, rules, batch: int, length: int):
  """The forward jitted for one input shape on a mesh: params in their logical shardings,
  ids and mask over the batch axes, logits over batch and vocabulary."""
  import flax.linen as nn
  import jax
  from flexolmo_jax.model import FlexOlmo
  from flexolmo_jax.parallel import activation_sharding, param_shardings
  model = FlexOlmo(cfg)

  def fn(params, ids, mask):
    with nn.logical_axis_rules(rules):
      return model.apply({"params": params}, ids, expert_mask=mask)[0]
  ids = activation_sharding(mesh, ("act_batch", "act_length"), (batch, length), rules)
  mask = activation_sharding(mesh, ("act_batch", None), (batch, max(cfg.num_experts, 1)), rules)
  logits = activation_sharding(mesh, ("act_batch", "act_length", "act_vocab"),
                               (batch, length, cfg.vocab_size), rules)
  return jax.jit(fn, in_shardings=(param_shardings(cfg, mesh, rules), ids, mask),
                 out_shardings=logits), (ids, mask)


def _to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as one numpy array on every host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global(x: np.ndarray, sharding):
  """A host array that every host holds whole -> a global array in `sharding`."""
  import jax
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class Model:
  """A loaded model. `logits(input_ids)` -> numpy [B, T, V] float32; `generate(prompts)`.

  mesh / rules: where the params live (None: one device) and the logical axis rules that
  placed them; both calls then run sharded on that mesh.
  """

  def __init__(self, path, cfg, params, exclude: Sequence[str], meta, manifest, mesh=None,
               rules=None):
    from flexolmo_jax.model.expert_mask import expert_mask
    self.path = as_path(path)
    self.config = cfg
    self.params = params
    self.meta = meta
    self.manifest = manifest
    self.mesh = mesh
    self.rules = rules
    self.expert_names = tuple(cfg.names) if cfg.is_moe else ()
    self.exclude = tuple(exclude)
    if self.exclude:
      expert_mask(self.expert_names, self.exclude)  # unknown names raise UnknownExpertError
    self._fn = None
    self._generate_fns = {}

  def _mask(self, batch: int, exclude):
    from flexolmo_jax.model.expert_mask import expert_mask
    if not self.config.is_moe:
      return None
    return expert_mask(self.expert_names, exclude, batch=batch)

  def logits(self, input_ids, exclude: Sequence[str] | None = None) -> np.ndarray:
    """exclude (optional) overrides the load-time exclusion for this call; it may also be a
    list of per-example name lists, one per batch row."""
    import jax.numpy as jnp
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T] (or [T]), got shape {ids.shape}")
    if self._fn is None:
      self._fn = _forward(self.config)
    if not self.config.is_moe and exclude:
      from flexolmo_jax.model.expert_mask import UnknownExpertError
      raise UnknownExpertError(f"{self.path} is a dense model with no experts; cannot exclude "
                               f"{list(exclude)}")
    mask = self._mask(ids.shape[0], self.exclude if exclude is None else exclude)
    if self.mesh is not None:
      import jax
      fn, (ids_sh, mask_sh) = _sharded_forward(self.config, self.mesh, self.rules, *ids.shape)
      with jax.set_mesh(self.mesh):
        out = fn(self.params, _global(ids.astype(np.int32), ids_sh),
                 None if mask is None else _global(np.asarray(mask), mask_sh))
      return _to_host(out).astype(np.float32)
    out = self._fn(self.params, jnp.asarray(ids, jnp.int32),
                   None if mask is None else jnp.asarray(mask))
    return np.asarray(out, np.float32)

  def generate(self, prompts, sampling=None, exclude=None, seed: int = 0) -> list[list[int]]:
    """Generated token ids per prompt (lists of ids; inference/generate.py), on the model's
    mesh when it has one. sampling: a `Sampling` (default: greedy, 64 new tokens); exclude:
    as in `logits` (default: the load-time exclusion)."""
    from flexolmo_jax.inference.generate import Sampling, generate, make_generate_fn
    exclude = self.exclude if exclude is None else exclude
    s = sampling or Sampling()
    if s not in self._generate_fns:  # one compiled program per sampling setting (and shape)
      self._generate_fns[s] = make_generate_fn(self.config, s, self.mesh, self.rules)
    return generate(self.params, self.config, prompts, s, exclude, seed,
                    fn=self._generate_fns[s], mesh=self.mesh, rules=self.rules)


def load(path, exclude: Sequence[str] = (), attention: str | None = None, mesh=None,
         rules=None, **overrides) -> Model:
  """Load a model directory / training workdir / imported HF model.

  exclude: expert names to opt out of (unknown names raise UnknownExpertError).
  mesh: a jax Mesh with the axes (data, fsdp, expert, tensor), or their sizes as a dict
  (e.g. {"fsdp": 2, "tensor": 4}; one may be -1): params are restored straight into their
  shardings there and `logits` / `generate` run sharded. None: one device, as before.
  rules: logical axis rules (a config's `axis_rules`; default DEFAULT_RULES, every config's).
  attention: the attention kernel, overriding the stored config's (xla | chunked | splash |
  cudnn; model/attention.py); None keeps it.
  overrides: ModelConfig fields that do not change parameter shapes, e.g. dtype="float32"
  (compute precision) or dispatch="capacity".

  Compute precision: the model computes in the dtype of its saved config, which is bfloat16
  (bf16 matmul operands, fp32 accumulation, norms and softmax in fp32) unless it was trained
  or imported with another, *even when the weights are stored in float32*. transformers
  computes in the weights' dtype instead, so to compare logits with an fp32 transformers model
  pass dtype="float32"; expect ~1e-2 differences otherwise.
  """
  from flexolmo_jax.storage import model_io
  from flexolmo_jax.model.expert_mask import UnknownExpertError
  from flexolmo_jax.storage.sources import resolve
  if isinstance(exclude, str):
    exclude = [n for n in exclude.split(",") if n]
  src = resolve(path, "model")
  if attention is not None:
    overrides = dict(overrides, attention=attention)
  cfg = src.cfg.replace(**overrides) if overrides else src.cfg
  if not model_io.same_architecture(cfg, src.cfg):
    raise ValueError(f"overrides {overrides} change parameter shapes; only numerics/dispatch "
                     f"fields may be overridden")
  if exclude and not cfg.is_moe:
    raise UnknownExpertError(f"{path} is a dense model with no experts; cannot exclude "
                             f"{list(exclude)}")
  if cfg.is_moe:  # fail on unknown names before reading any weights
    from flexolmo_jax.model.expert_mask import expert_mask
    expert_mask(cfg.names, list(exclude))
  shardings = None
  if mesh is not None:
    from jax.sharding import Mesh
    from flexolmo_jax.parallel import make_mesh, param_shardings, rules_from_config
    rules = rules_from_config(rules)
    if not isinstance(mesh, Mesh):
      mesh = make_mesh(mesh)
    shardings = param_shardings(cfg, mesh, rules)
  params = model_io.load_params(src.model_dir, cfg, shardings=shardings)
  manifest_file = src.model_dir / model_io.MANIFEST_FILE
  manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
  return Model(src.model_dir, cfg, params, exclude, src.meta, manifest, mesh,
               rules if mesh is not None else None)


def load_model(path, mesh, rules, attention: str | None = None, **overrides):
  """(cfg, params) of a model directory, params restored straight into their shardings.

  attention: the attention kernel (None: the stored config's), as in `load`.
  overrides: ModelConfig fields that do not change parameter shapes (dispatch, dtype, ...).
  """
  from flexolmo_jax.parallel import param_shardings
  from flexolmo_jax.storage import model_io
  from flexolmo_jax.storage.sources import resolve_model_dir
  path = resolve_model_dir(path)
  cfg = model_io.read_config(path)
  overrides = {k: v for k, v in dict(overrides, attention=attention).items() if v is not None}
  if overrides:
    cfg = cfg.replace(**overrides)
  params = model_io.load_params(path, cfg, shardings=param_shardings(cfg, mesh, rules))
  return cfg, params
