"""CPU fast path: XLA:CPU compiler options for the programs of a run on CPUs.

Chosen by timing the WRN-28-2 SeMi train step (`python -m semi_jax.tools.bench`) on 2-core x86-64 AVX-512 VMs:
- `xla_cpu_experimental_ynn_fusion_type=''` turns YNNPACK off: the pinned jaxlib hands it matrix products and
  convolutions by default, and its kernels ran this model's products and convolution gradients slower than
  XLA's Eigen path (4.1 s vs 3.0 s per step).
- `xla_cpu_experimental_onednn_custom_call=True` runs convolutions with oneDNN: 1.5-2.5x faster than Eigen for
  the forward and input-gradient convolutions. XLA's kernel-gradient convolution is the one shape oneDNN runs
  slower; `semi_jax/cpu/conv.py` keeps it on Eigen.

They go to `jax.jit(..., compiler_options=...)` of the run's own programs, not into XLA_FLAGS: XLA aborts the
whole process on an unknown flag in XLA_FLAGS, while an unknown compiler option is an ordinary error. Each
option is tried once on a tiny program (`supported`), and one the installed jaxlib lacks is left out with a
warning. An option the user names in XLA_FLAGS is left to that setting (e.g.
XLA_FLAGS=--xla_cpu_experimental_onednn_custom_call=false goes back to Eigen convolutions). One cost of oneDNN
calls: XLA cannot serialise programs that contain them, so JAX's persistent compilation cache skips those
programs.
"""
from __future__ import annotations

import functools
import os

from absl import logging

OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_onednn_custom_call": True}


def named_in_xla_flags(xla_flags: str) -> set[str]:
  """The option names an XLA_FLAGS string sets (`--name=value` or `--name`)."""
  return {flag.lstrip("-").split("=", 1)[0] for flag in xla_flags.split() if flag.startswith("--")}


@functools.cache
def supported(name: str, value) -> bool:
  """Whether the installed jaxlib's CPU compiler accepts the option (tried once per process)."""
  import jax
  import numpy as np
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}, backend="cpu").lower(np.float32(0)).compile()
  except Exception as e:  # noqa: BLE001 - jaxlib raises its own runtime error type for an unknown option
    logging.warning("XLA:CPU option %s is not known to this jaxlib (%s); compiling without it.", name,
                    str(e).splitlines()[0])
    return False
  return True


def for_run(fast_paths: bool, xla_flags: str | None = None) -> dict:
  """The compiler options of a run's programs: none unless the CPU fast paths are on (`semi_jax.cpu.enabled`);
  else OPTIONS, less those XLA_FLAGS names and those this jaxlib does not know."""
  if not fast_paths:
    return {}
  named = named_in_xla_flags(os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags)
  return {name: value for name, value in OPTIONS.items() if name not in named and supported(name, value)}
