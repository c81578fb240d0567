"""`python -m flexolmo_jax.proxy_data`; the code is in flexolmo_jax/data/proxy_data_cli.py."""
from flexolmo_jax.data.proxy_data_cli import main

if __name__ == "__main__":
  main()
