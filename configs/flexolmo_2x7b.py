"""Expert training on OLMo 2 7B: public FFN (frozen) + one domain expert, top-2 of 2.

Argument: the domain name of the data owner's expert (default "math"). Both experts run on
every token, so dispatch is `dense`. The learned bias on expert 1 is on (training only).

  python -m flexolmo_jax.inspect --config=configs/flexolmo_2x7b.py:math
"""
from flexolmo_jax import config_base as cb


def get_config(arg=None):
  domain = arg or "math"
  model = cb.model_block(**cb.OLMO2_7B, **cb.moe_fields(("public", domain), top_k=2,
                                                        expert_bias=True, dispatch="dense"))
  config = cb.base_config(model)
  config.model.remat_policy = "full"
  return config
