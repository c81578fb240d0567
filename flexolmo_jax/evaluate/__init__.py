"""Evaluation with expert opt-out: perplexity per domain, multiple-choice tasks, routing.

  python -m flexolmo_jax.evaluate --ckpt=DIR --data=DATA --tasks=T.jsonl --opt-out-matrix --out=OUT
"""
