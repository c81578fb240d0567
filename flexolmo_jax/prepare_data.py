"""`python -m flexolmo_jax.prepare_data`; the code is in flexolmo_jax/data/prepare_data.py."""
from flexolmo_jax.data.prepare_data import main

if __name__ == "__main__":
  main()
