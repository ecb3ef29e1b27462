"""XLA flags semi_jax sets by default, before JAX starts its backends.

Both concern XLA:CPU only and were chosen by timing the WRN-28-2 SeMi train step (`python -m semi_jax.bench`)
on 2-core x86-64 AVX-512 VMs:
- `--xla_cpu_experimental_ynn_fusion_type=` turns YNNPACK off: the pinned jaxlib hands it matrix products and
  convolutions by default, and its kernels ran this model's products and convolution gradients slower than
  XLA's Eigen path (4.1 s vs 3.0 s per step).
- `--xla_cpu_experimental_onednn_custom_call=true` runs convolutions with oneDNN: 1.5-2.5x faster than Eigen
  for the forward and input-gradient convolutions. XLA's kernel-gradient convolution is the one shape oneDNN
  runs slower; `semi_jax/models/conv.py` keeps it on Eigen.

A flag is appended to XLA_FLAGS only when XLA_FLAGS does not name it already, so a user's own setting wins:
e.g. XLA_FLAGS=--xla_cpu_experimental_onednn_custom_call=false goes back to Eigen convolutions. Flags are read
when JAX creates its first backend; importing semi_jax after that leaves them without effect.
"""
from __future__ import annotations

import os

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_experimental_onednn_custom_call=true")


def with_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each default flag whose name it does not set."""
  named = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  missing = [flag for flag in DEFAULT_FLAGS if flag.split("=", 1)[0] not in named]
  return " ".join([xla_flags.strip()] + missing).strip()


def apply_defaults() -> None:
  os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
