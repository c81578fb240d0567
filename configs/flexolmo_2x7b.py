"""Expert training on OLMo 2 7B: public FFN (frozen) + one domain expert, top-2 of 2.

Argument: the domain name of the data owner's expert (default "math"). Both experts run on
every token, so dispatch is `dense`. The learned bias on expert 1 is on (training only).
Training block (FLEXOLMO.md section 1.2): seq 4096, 128 x 4096 tokens per step (2 sequences
per chip on a v5p-128 slice), ~50B tokens = 95,000 steps. Set the data and the public model:

  python -m flexolmo_jax.inspect --config=configs/flexolmo_2x7b.py:math
  python -m flexolmo_jax.aot --config=configs/flexolmo_2x7b.py:math --topology=v5p:4x4x4
  python -m flexolmo_jax.train --config=configs/flexolmo_2x7b.py:math --workdir=W \
      --config.data.root=DATA --config.data.sources="[('math', 1.0)]" \
      --config.data.tokenizer=tokenizer.json --config.init.public=OLMO2_7B_MODEL_DIR \
      --config.init.public_embedding=public.npy --config.init.domain_embedding=math.npy
"""
from flexolmo_jax import config_base as cb


def get_config(arg=None):
  domain = arg or "math"
  model = cb.model_block(**cb.OLMO2_7B, **cb.moe_fields(("public", domain), top_k=2,
                                                        expert_bias=True, dispatch="dense"))
  config = cb.base_config(model)
  config.model.remat_policy = "full"
  cb.add_training(config, "expert", seq_len=4096, global_batch_size=128, steps=95_000,
                  log_every=50)
  config.checkpoint.every = 1000
  config.eval.global_batch_size = 64
  return config
