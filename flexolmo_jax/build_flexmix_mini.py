"""`python -m flexolmo_jax.build_flexmix_mini`; the code is in flexolmo_jax/data/build_flexmix_mini.py."""
import sys

from flexolmo_jax.data.build_flexmix_mini import main  # noqa: F401

if __name__ == "__main__":
  sys.exit(main())
