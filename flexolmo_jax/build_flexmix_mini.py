"""`python -m flexolmo_jax.build_flexmix_mini`; the code is in flexolmo_jax/data/flexmix_mini/cli.py."""
from flexolmo_jax.data.flexmix_mini.cli import main

if __name__ == "__main__":
  main()
