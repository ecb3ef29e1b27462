"""semi_jax: SeMi (class-imbalanced semi-supervised learning by mining hard examples) in JAX/Flax."""
