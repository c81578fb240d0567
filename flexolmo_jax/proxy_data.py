"""`python -m flexolmo_jax.proxy_data`; the code is in flexolmo_jax/data/proxy_data.py."""
import sys

from flexolmo_jax.data.proxy_data import main  # noqa: F401

if __name__ == "__main__":
  sys.exit(main())
