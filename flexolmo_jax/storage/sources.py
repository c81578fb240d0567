"""What the coordinator points the tools at, resolved to a model directory.

Accepted: a model directory (DIR/params + DIR/model_config.json: a params-only export, a
stitched model, an imported HF model) or a training workdir, whose full params are in
WORKDIR/export (WORKDIR/checkpoints holds only the trainable slice, not enough on its own).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from etils import epath

from flexolmo_jax.storage import model_io
from flexolmo_jax.storage.paths import as_path
from flexolmo_jax.model.config import ModelConfig


GENERIC = ("model", "checkpoint")  # names that are not expert names


class SourceError(ValueError):
  """A path is not something the tools can read (message says what it is instead)."""


@dataclasses.dataclass(frozen=True)
class Source:
  name: str  # how messages and the manifest refer to it (expert name or "public")
  given: epath.Path  # what the user passed
  model_dir: epath.Path  # where the params are
  cfg: ModelConfig
  meta: dict[str, Any]
  kind: str  # "model_dir" | "workdir"

  @property
  def step(self):
    return self.meta.get("step")

  def describe(self) -> str:
    if self.name in GENERIC:
      return str(self.given)
    return f"{self.name!r} ({self.given})"

  def record(self) -> dict[str, Any]:
    """Provenance for the manifest."""
    return {"path": str(self.given), "model_dir": str(self.model_dir), "kind": self.kind,
            "step": self.step, "stage": self.meta.get("stage")}


def _checkpoint_steps(workdir: epath.Path) -> list[int]:
  d = workdir / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def resolve(path, name: str = "model") -> Source:
  given = epath.Path(path).expanduser()
  p = as_path(given)
  if not p.exists():
    raise SourceError(f"{name}: {given} does not exist")
  # Unsealed directories are taken here and refused by read_config, naming them as incomplete.
  if model_io.looks_like_model_dir(p):
    model_dir, kind = p, "model_dir"
  elif model_io.looks_like_model_dir(p / "export"):
    model_dir, kind = p / "export", "workdir"
  elif (p / "checkpoints").is_dir():
    steps = _checkpoint_steps(p)
    raise SourceError(
        f"{name}: {given} is a training workdir without an export (training not finished? "
        f"checkpoints: {steps or 'none'}). Its checkpoints hold only the trainable slice; "
        f"finish training (or rerun it: it resumes and exports) to get {p / 'export'}.")
  elif (p / "config.json").is_file():
    raise SourceError(f"{name}: {given} looks like a HuggingFace model; import it first with "
                      f"python -m flexolmo_jax.convert from_hf --hf={given} --out=DIR")
  else:
    raise SourceError(f"{name}: {given} is neither a model directory (params/ + "
                      f"{model_io.CONFIG_FILE}) nor a training workdir (export/)")
  try:
    cfg = model_io.read_config(model_dir)
  except (ValueError, TypeError) as e:
    raise SourceError(f"{name}: cannot read the model config of {model_dir}: {e}") from e
  meta = model_io.read_meta(model_dir)
  if kind == "workdir":
    steps = _checkpoint_steps(p)
    if steps and meta.get("step") is not None and steps[-1] > int(meta["step"]):
      logging.warning("%s: %s/export is step %s but checkpoints reach step %d (training resumed "
                      "and not finished?); using the export", name, given, meta["step"], steps[-1])
  return Source(name=name, given=given, model_dir=model_dir, cfg=cfg, meta=meta, kind=kind)


def resolve_model_dir(path) -> epath.Path:
  """A model directory, or a training workdir whose export/ is one (same rules and messages
  as the stitcher's sources)."""
  return resolve(path, "model").model_dir
