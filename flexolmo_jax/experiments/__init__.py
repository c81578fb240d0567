"""End-to-end runs built from the stage packages: the demo (the whole FlexOlmo lifecycle on
FlexMix-mini)."""
