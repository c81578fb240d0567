"""`python -m flexolmo_jax.experiments`: the experiments suite (experiments/suite.py)."""
from flexolmo_jax.experiments.suite import main

if __name__ == "__main__":
  main()
