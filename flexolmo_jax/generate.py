"""`python -m flexolmo_jax.generate`; the code is in flexolmo_jax/inference/generate_cli.py."""
from flexolmo_jax.inference.generate_cli import main

if __name__ == "__main__":
  main()
