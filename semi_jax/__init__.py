"""semi_jax: SeMi (class-imbalanced semi-supervised learning by mining hard examples) in JAX/Flax."""
from semi_jax import xla_flags as _xla_flags

_xla_flags.apply_defaults()
