"""Dense OLMo 2 7B: the public model of the flagship (7,298,617,344 parameters).

  python -m flexolmo_jax.inspect --config=configs/olmo2_7b.py
"""
from flexolmo_jax import config_base as cb


def get_config(arg=None):
  del arg
  return cb.base_config(cb.model_block(**cb.OLMO2_7B))
