"""What the run-time tools (evaluate, generate) share: model loading onto a mesh, multi-host
start-up, flag parsing helpers and atomic output files."""
from __future__ import annotations

import os
import pathlib
import tempfile

from flexolmo_jax import model_io


def write_text_atomic(path, text: str | bytes) -> pathlib.Path:
  """Write to a temporary sibling, then rename: readers never see a partial file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = text.encode() if isinstance(text, str) else text
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def resolve_model_dir(path) -> pathlib.Path:
  """A model directory, or a training workdir whose export/ is one (same rules and messages
  as the stitcher's sources)."""
  from flexolmo_jax.stitch.sources import resolve
  return resolve(path, "model").model_dir


def parse_names(text: str | None) -> list[str]:
  """'a,b' -> ['a', 'b'] (empty or None -> [])."""
  return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_mesh(text: str | None) -> dict[str, int]:
  """'fsdp=-1,tensor=2' -> {'fsdp': -1, 'tensor': 2}; empty -> all devices on fsdp."""
  if not text:
    return {"fsdp": -1}
  out = {}
  for item in parse_names(text):
    name, _, size = item.partition("=")
    try:
      out[name.strip()] = int(size)
    except ValueError:
      raise ValueError(f"bad --mesh entry {item!r}; expected axis=size, e.g. fsdp=-1") from None
  return out


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, mode: str = "auto",
                     cpu_devices: int | None = None) -> None:
  """Multi-host start-up, as in training: on TPU pods jax.distributed finds its peers itself."""
  import jax
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif mode == "on" or (mode == "auto" and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()


def load_model(path, mesh, rules, **overrides):
  """(cfg, params) of a model directory, params restored straight into their shardings.

  overrides: ModelConfig fields that do not change parameter shapes (dispatch, dtype, ...).
  """
  from flexolmo_jax.parallel import param_shardings
  path = resolve_model_dir(path)
  cfg = model_io.read_config(path)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if overrides:
    cfg = cfg.replace(**overrides)
  params = model_io.load_params(path, cfg, shardings=param_shardings(cfg, mesh, rules))
  return cfg, params
