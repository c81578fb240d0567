"""Mixtral-8x7B shapes, MaxText's benchmark setup: the AOT planner's calibration anchor.

Not a FlexOlmo model: it exists so the planner can be compared with a published measurement.
MaxText trains Mixtral-8x7B at 54.89% MFU (251.94 TFLOP/s per chip) on v5p-128 (FLEXOLMO.md
section 10), with per-device batch 12, seq 4096, FSDP over every chip, flash attention,
megablox (dropless) and bf16 compute. flexolmo_jax/aot/calibration.py turns that into the
planner's one-parameter efficiency factor.

Shapes: d_model 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, SwiGLU ffn 14336,
vocab 32000, 8 experts top-2 (46.7B parameters, 12.9B active per token). What differs from
Mixtral and is kept on purpose (it is our code that is being planned): OLMo 2's block (QK-norm,
post-norms instead of pre-norms: elementwise work only, same matmuls), untied embeddings
(as Mixtral), f32 master weights and AdamW state. Remat: MaxText's dropless recipe uses
`remat_policy=full` (its dropped one offloads projections to host memory, which we cannot
express); ours is `full` too. Dispatch: capacity with factor 1.0 and the gather formulation,
the FLOP-equivalent of MaxText's dropless run: each expert runs exactly k T / E rows (dropless
runs the same total; a drop-free balance is assumed) and no one-hot dispatch einsums. Our
dropless path is no option at this scale (it sorts the tokens of the whole global batch:
2.5 TB of temporaries per chip at 1536 x 4096, planner, 2 layers), and capacity 1.25 with the
einsum formulation (TPU default; MaxText's dropped variant) executes 1.90x the model FLOPs
instead of 1.38x, which would make the anchor compare two different programs. The gather
dispatch partitions badly under FSDP (all-reduces of 17 TB per chip per step): that is why
the calibration takes this plan's compute term only (aot/calibration.py).
Attention: `xla` (the exact reference; the full square, MaxText's flash with 2048 blocks
computes 3/4 of it); override with `--config.model.attention=splash` once that kernel plans
for TPU (the planner's result records which one ran).

  python -m flexolmo_jax.aot --config=configs/mixtral_8x7b.py --topology=v5p:4x4x8 \
      --mode=train --per_device_batch=12
"""
from flexolmo_jax import config_base as cb

MIXTRAL_8X7B = dict(
    vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
    ffn_hidden=14_336, rope_theta=1_000_000.0, norm_eps=1e-5, max_seq_len=4096,
    eos_token_id=2, pad_token_id=0, bos_token_id=1,
)


def get_config(arg=None):
  del arg
  names = tuple(f"expert{i}" for i in range(8))
  config = cb.base_config(cb.model_block(**MIXTRAL_8X7B,
                                         **cb.moe_fields(names, top_k=2, dispatch="capacity",
                                                        capacity_factor=1.0,
                                                        capacity_impl="gather")))
  config.model.remat_policy = "full"
  # Every parameter trains (the "public" stage); 12 sequences per chip on 128 chips.
  cb.add_training(config, "public", seq_len=4096, global_batch_size=12 * 128, steps=100)
  return config
