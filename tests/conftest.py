"""Test setup: 8 virtual CPU devices for sharding tests (must precede the first jax import)."""
import os
import shutil
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# libtpu (the `tpu` extra, for the AOT tests) would otherwise probe for a TPU in every process;
# topologies for ahead-of-time compilation still work with the CPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA compilation cache for the processes the tests start (the CLIs, the demo,
# multi-process and resumed trainings): they compile the same few tiny programs again and
# again, and on CPU compiling is most of a tiny stage's time. One directory per test run,
# shared by its xdist workers (PYTEST_XDIST_TESTRUNUID) and removed at the end. The pytest
# processes themselves compile without it: their tests read compiled executables' analyses.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
_CACHE = os.path.join(tempfile.gettempdir(), f"flexolmo_jax_tests_xla_cache_{_RUN}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput"):  # the controller, after every worker is done
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def flexmix_tiny(tmp_path_factory):
  """FlexMix-mini at a tenth of its size (built once per test session)."""
  from flexolmo_jax.data import build_flexmix_mini
  out = tmp_path_factory.mktemp("flexmix") / "flexmix_mini"
  build_flexmix_mini(str(out), scale=0.1, seq_len=64)
  return out


@pytest.fixture(scope="session")
def public_model(flexmix_tiny, tmp_path_factory):
  """A tiny public model trained on the public split, with public/math domain embeddings."""
  import numpy as np
  from flexolmo_jax.train.trainer import train
  from train_utils import tiny_stage_config
  work = tmp_path_factory.mktemp("public")
  config = tiny_stage_config("public", flexmix_tiny, steps=40, log_every=10)
  config.checkpoint.every = 20
  summary = train(config, work)
  rng = np.random.default_rng(0)
  embeddings = {}
  for name in ("public", "math", "code", "legal"):
    v = rng.normal(size=config.model.d_model).astype(np.float32)
    path = work / f"{name}.npy"
    np.save(path, v / np.linalg.norm(v))
    embeddings[name] = path
  return {"dir": work / "export", "summary": summary, "embeddings": embeddings,
          "data": flexmix_tiny}
