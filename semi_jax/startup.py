"""What every command that trains or times steps does once, before JAX computes anything.

`semi_jax.main`, `semi_jax.sweep` and the benchmarks in `semi_jax.tools` call `prepare(cpu_fast_paths)`: the
glibc malloc settings of the CPU fast paths (`semi_jax.cpu.malloc`, which must come before JAX and TensorFlow
start their threads), and TensorFlow, which only feeds tf.data, kept off every GPU so that JAX owns them.
Importing this module does nothing.
"""
from __future__ import annotations


def prepare(cpu_fast_paths: str = "auto") -> str:
  """Prepares the process; returns what was done to malloc (for logs). A bad setting raises ValueError."""
  from semi_jax.cpu import malloc
  status = malloc.apply(cpu_fast_paths)
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  return status
