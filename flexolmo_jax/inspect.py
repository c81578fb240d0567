"""`python -m flexolmo_jax.inspect`; the code is in flexolmo_jax/model/inspect.py."""
from flexolmo_jax.model.inspect import main

if __name__ == "__main__":
  main()
