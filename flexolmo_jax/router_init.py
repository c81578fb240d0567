"""`python -m flexolmo_jax.router_init`; the code is in flexolmo_jax/data/router_init.py."""
from flexolmo_jax.data.router_init import main

if __name__ == "__main__":
  main()
