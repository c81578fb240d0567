"""`python -m flexolmo_jax.demo`; the code is in flexolmo_jax/experiments/demo.py."""
from flexolmo_jax.experiments.demo import main

if __name__ == "__main__":
  main()
