"""Device mesh and logical-axis sharding."""
from flexolmo_jax.parallel.sharding import (MESH_AXES, DEFAULT_RULES, fit_spec, logical_shardings,
                                            make_mesh, rules_from_config)

__all__ = ["MESH_AXES", "DEFAULT_RULES", "fit_spec", "logical_shardings", "make_mesh",
           "rules_from_config"]
