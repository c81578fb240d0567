"""FlexOlmo 8x7B, the "37B" flagship: public expert + seven FlexMix domain experts, top-4.

37,599,318,016 parameters, 20,285,231,104 active per token.

  python -m flexolmo_jax.inspect --config=configs/flexolmo_8x7b.py
  python -m flexolmo_jax.inspect --config=configs/flexolmo_8x7b.py --config.model.top_k=2
"""
from flexolmo_jax import config_base as cb


def get_config(arg=None):
  del arg
  names = ("public",) + cb.FLEXMIX_DOMAINS
  return cb.base_config(cb.model_block(**cb.OLMO2_7B,
                                       **cb.moe_fields(names, top_k=4, dispatch="dropless")))
