"""`python -m flexolmo_jax.prepare_data`; the code is in flexolmo_jax/data/prepare_data.py."""
import sys

from flexolmo_jax.data.prepare_data import main  # noqa: F401

if __name__ == "__main__":
  sys.exit(main())
