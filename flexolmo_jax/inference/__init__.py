"""Inference: `load` (a path on disk -> logits, with expert opt-out, or params on a mesh) and
`generate` (batched decoding with a KV cache and per-example expert masks)."""
