"""End-to-end runs built from the stage packages: the demo (the whole FlexOlmo lifecycle on
FlexMix-mini) and the experiments suite (the paper's claims, baselines and ablations over
seeds: `python -m flexolmo_jax.experiments`)."""
