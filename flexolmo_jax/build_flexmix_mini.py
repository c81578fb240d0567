"""`python -m flexolmo_jax.build_flexmix_mini`; the code is in flexolmo_jax/data/flexmix_mini/cli.py."""
import sys

from flexolmo_jax.data.flexmix_mini.cli import main  # noqa: F401

if __name__ == "__main__":
  sys.exit(main())
