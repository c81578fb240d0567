"""`python -m flexolmo_jax.generate`; the code is in flexolmo_jax/inference/generate.py."""
import sys

from flexolmo_jax.inference.generate import main  # noqa: F401

if __name__ == "__main__":
  sys.exit(main())
