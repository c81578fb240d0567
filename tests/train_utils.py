"""Shared fixtures for training tests: a tiny FlexMix-mini, configs, a trained public model."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def tiny_stage_config(stage: str, data_root, domain: str = "math", **train):
  arg = f"{stage},{domain},tiny" if stage == "expert" else f"{stage},tiny"
  config = load_config("flexmix_mini", arg)
  config.data.root = str(data_root)
  config.data.num_threads = 1
  for k, v in train.items():
    config.train[k] = v
  return config


def unit(v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v)
