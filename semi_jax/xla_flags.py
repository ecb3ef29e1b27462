"""XLA flags semi_jax sets by default, before JAX starts its backends.

XLA:CPU of the pinned jaxlib hands matrix products to YNNPACK by default; on the x86 CPUs measured (2-core
AVX-512 VMs) its kernels ran this model's products and convolution gradients slower than XLA's Eigen path: the
WRN-28-2 SeMi train step took 4.1 s with YNNPACK and 3.0 s without (`python -m semi_jax.bench`). The flag only
affects the CPU backend.

A flag is appended to XLA_FLAGS only when XLA_FLAGS does not name it already, so a user's own setting wins:
e.g. XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot puts YNNPACK's products back. Flags are
read when JAX creates its first backend; importing semi_jax after that leaves them without effect.
"""
from __future__ import annotations

import os

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def with_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each default flag whose name it does not set."""
  named = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  missing = [flag for flag in DEFAULT_FLAGS if flag.split("=", 1)[0] not in named]
  return " ".join([xla_flags.strip()] + missing).strip()


def apply_defaults() -> None:
  os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
