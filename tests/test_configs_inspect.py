"""Configs load, override and count exactly; the inspect CLI reports them without allocating."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from flexolmo_jax import config_base
from flexolmo_jax.model import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_a_model_config_and_documents_its_command(name):
  config = load(name)
  cfg = config_base.model_config(config)
  assert cfg.vocab_size % 128 == 0 or name == "tiny"
  doc = (ROOT / "configs" / f"{name}.py").read_text().split('"""')[1]
  assert "python " in doc, f"configs/{name}.py docstring must hold the command that uses it"
  assert set(config.mesh.keys()) == {"data", "fsdp", "expert", "tensor"}


@pytest.mark.parametrize("name,total,active", [
    ("olmo2_7b", 7_298_617_344, 7_298_617_344),
    ("flexolmo_2x7b", 11_627_401_216, 11_627_401_216),
    ("flexolmo_7x7b", 33_270_665_216, 20_285_100_032),
    ("flexolmo_8x7b", 37_599_318_016, 20_285_231_104),
])
def test_inspect_json_reports_paper_counts(name, total, active):
  out = subprocess.run([sys.executable, "-m", "flexolmo_jax.inspect",
                        f"--config={ROOT / 'configs' / (name + '.py')}", "--json"],
                       capture_output=True, text=True, cwd=ROOT, check=True, timeout=300)
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["total_params"] == total
  assert summary["active_params"] == active
  assert "decoder/layers/self_attn/q_proj" in out.stdout


def test_inspect_applies_command_line_overrides():
  out = subprocess.run([sys.executable, "-m", "flexolmo_jax.inspect",
                        f"--config={ROOT / 'configs' / 'flexolmo_8x7b.py'}", "--json",
                        "--config.model.top_k=2"],
                       capture_output=True, text=True, cwd=ROOT, check=True, timeout=300)
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["top_k"] == 2
  # Formula of FLEXOLMO.md section 4: Active(E, k) = 2Vd + d + L[4d^2 + 4d + 3dIk + Ed].
  V, d, L, I, E, k = 100_352, 4096, 32, 11_008, 8, 2
  assert summary["active_params"] == 2 * V * d + d + L * (4 * d * d + 4 * d + 3 * d * I * k + E * d)


def test_tiny_expert_config_counts_bias_separately():
  cfg = config_base.model_config(load("tiny", "expert"))
  counts = count_params(cfg)
  assert counts["bias_params"] == cfg.n_layers * cfg.num_experts
  assert cfg.expert_bias and cfg.top_k == cfg.num_experts == 2


def test_bad_configs_are_rejected():
  with pytest.raises(ValueError, match="unknown tiny config"):
    load("tiny", "huge")
  config = load("tiny", "moe4")
  config.model.top_k = 5
  with pytest.raises(ValueError, match="top_k"):
    config_base.model_config(config)
  config = load("tiny", "moe4")
  config.model.dispatch = "magic"
  with pytest.raises(ValueError, match="dispatch"):
    config_base.model_config(config)
