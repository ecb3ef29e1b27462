"""CPU fast path: glibc malloc settings that let XLA:CPU reuse its large scratch buffers instead of page-faulting
them in anew.

XLA:CPU's Eigen convolutions allocate packing buffers of up to ~300 MB (WRN-28-2, batch 256) with malloc on
their worker threads, on every call. glibc serves requests that large from fresh `mmap`s, and from a worker
thread's own arena it has no other choice; `free` unmaps them, so the next call page-faults and zero-fills them
again. Measured on a 2-core x86-64 VM: 260,000 minor page faults and 0.5 s of system time per WRN-28-2 train
step, and every large temporary written at a third of the memory bandwidth. One arena, no mmap-served chunks and
no trimming keep freed memory in the heap for the next step: no page faults, about 6 % off the step.

The costs: the process keeps its peak heap (which a training run reaches every step anyway), and all threads
share one arena. Sharing made compilation-heavy test runs about 30 % slower here (a train step repays the extra
compile time after some 20 steps), and the tf.data input pipeline about half as fast (still over 10x what the CPU
train step consumes). So the entry points that train or time steps (`semi_jax.main`, `semi_jax.sweep`,
`semi_jax.tools.bench`) call `apply(config.cpu_fast_paths)` before JAX and TensorFlow start their threads, and
importing semi_jax does not. Sharing could also slow an input pipeline with many threads on a big accelerator
host, where the CPU does no model work. With the setting 'auto' the settings therefore apply only when JAX will
compute on the CPU, as far as can be told before JAX starts: JAX_PLATFORMS unset or `cpu`, and no GPU/TPU plugin
installed. 'on' applies them, 'off' does not. They are left alone outside Linux/glibc and when the user already
configures malloc through MALLOC_* or GLIBC_TUNABLES.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os

from semi_jax import cpu

# mallopt parameters (malloc.h). A value of -1 for M_TRIM_THRESHOLD becomes SIZE_MAX: never trim.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOPT = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
_USER_MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                     "MALLOC_TOP_PAD_")
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin")

status = "not applied"  # what `apply()` did, for benchmarks and logs


def reason_to_skip(setting: str = "auto", environ=os.environ, plugin_installed=None) -> str | None:
  """Why the settings should not be applied in this process, or None to apply them. `setting` is the run's
  `cpu_fast_paths` ('auto', 'on' or 'off')."""
  if cpu.check_setting(setting) == "off":
    return "cpu_fast_paths=off"
  user_vars = [v for v in _USER_MALLOC_VARS if v in environ]
  if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
    user_vars.append("GLIBC_TUNABLES")
  if user_vars:
    return f"malloc configured by the user ({', '.join(user_vars)})"
  if setting == "on":
    return None
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms and platforms != ["cpu"]:
    return f"JAX_PLATFORMS={environ['JAX_PLATFORMS']}"
  if plugin_installed is None:
    plugin_installed = lambda name: importlib.util.find_spec(name) is not None
  plugins = [name for name in _ACCELERATOR_PLUGINS if plugin_installed(name)]
  if plugins and not platforms:
    return f"accelerator plugin installed ({', '.join(plugins)})"
  return None


def _glibc():
  path = ctypes.util.find_library("c")
  if not path:
    return None
  try:
    libc = ctypes.CDLL(path)
    libc.gnu_get_libc_version  # only glibc has it
    libc.mallopt
  except (OSError, AttributeError):
    return None
  return libc


def apply(setting: str = "auto") -> str:
  """Applies the settings unless `reason_to_skip(setting)` says otherwise; returns and records what happened."""
  global status
  reason = reason_to_skip(setting)
  libc = None if reason else _glibc()
  if reason is None and libc is None:
    reason = "not glibc"
  if reason is None:
    failed = [param for param, value in MALLOPT if libc.mallopt(param, value) != 1]
    reason = f"mallopt refused parameters {failed}" if failed else None
  status = "one arena, no mmap, no trim" if reason is None else f"glibc defaults: {reason}"
  return status

