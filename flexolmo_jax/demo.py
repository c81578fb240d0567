"""`python -m flexolmo_jax.demo`; the code is in flexolmo_jax/experiments/demo.py."""
from flexolmo_jax.experiments.demo import main  # noqa: F401

if __name__ == "__main__":
  main()
