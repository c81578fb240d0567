"""HuggingFace interop. hf_mapping works on numpy arrays only (no torch import)."""
