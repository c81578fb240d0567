"""FlexOlmo 7x7B: public expert + six domain experts on OLMo 2 7B, top-4.

  python -m flexolmo_jax.inspect --config=configs/flexolmo_7x7b.py
"""
from flexolmo_jax import config_base as cb


def get_config(arg=None):
  del arg
  names = ("public",) + cb.FLEXMIX_DOMAINS[:6]
  return cb.base_config(cb.model_block(**cb.OLMO2_7B,
                                       **cb.moe_fields(names, top_k=4, dispatch="dropless")))
