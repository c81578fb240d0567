"""Default runtime config of the tools that load a model directory (evaluate, generate,
proxy_data): only the mesh and the axis rules, as in every configs/X.py (config_base).

  python -m flexolmo_jax.evaluate ... --config.mesh.fsdp=2 --config.mesh.tensor=4
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  from flexolmo_jax.parallel.sharding import DEFAULT_RULES
  config = ml_collections.ConfigDict()
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  config.axis_rules = [list(r) for r in DEFAULT_RULES]
  return config
