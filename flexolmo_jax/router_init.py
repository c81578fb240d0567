"""`python -m flexolmo_jax.router_init`; the code is in flexolmo_jax/data/router_init.py."""
from absl import app

from flexolmo_jax.data.router_init import main  # noqa: F401

if __name__ == "__main__":
  app.run(main)
