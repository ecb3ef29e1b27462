"""The 'auto' choice of the layers that take a CPU-specific code path (BatchNorm's reduction, Conv's weight
gradient): the CPU path on the CPU backend, the plain one on GPU and TPU."""
from __future__ import annotations

import jax


def resolve(option: str, value: str, choices: tuple[str, ...], on_cpu: str, elsewhere: str) -> str:
  """`value` checked against `choices`; 'auto' becomes `on_cpu` or `elsewhere` by JAX's default backend."""
  if value not in choices:
    raise ValueError(f"{option} must be one of {choices}, got {value!r}.")
  if value == "auto":
    return on_cpu if jax.default_backend() == "cpu" else elsewhere
  return value
