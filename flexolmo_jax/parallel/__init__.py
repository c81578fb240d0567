"""Device mesh and logical-axis sharding."""
from flexolmo_jax.parallel.sharding import (MESH_AXES, DEFAULT_RULES, activation_sharding, fit_spec,
                                            logical_shardings, param_shardings,
                                            make_mesh, rules_from_config)

__all__ = ["MESH_AXES", "DEFAULT_RULES", "activation_sharding", "fit_spec", "logical_shardings",
           "make_mesh", "param_shardings",
           "rules_from_config"]
