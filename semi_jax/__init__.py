"""semi_jax: SeMi (class-imbalanced semi-supervised learning by mining hard examples) in JAX/Flax.

Importing any module of the package only defines things: no environment variable and no JAX setting changes.
"""
