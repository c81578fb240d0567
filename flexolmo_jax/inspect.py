"""`python -m flexolmo_jax.inspect`; the code is in flexolmo_jax/model/inspect.py."""
from absl import app

from flexolmo_jax.model.inspect import main  # noqa: F401

if __name__ == "__main__":
  app.run(main)
