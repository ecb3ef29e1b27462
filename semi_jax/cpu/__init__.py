"""CPU fast paths: the speed-ups that let semi_jax's train step beat the PyTorch reference on CPUs, and only there.

- layers (`conv.py`, `batch_norm.py`): a convolution and a BatchNorm with hand-written backward passes, shaped
  for XLA:CPU's kernels, replacing `flax.linen.Conv` / `flax.linen.BatchNorm` inside WideResNet;
- compiler options (`compiler_options.py`): XLA:CPU's oneDNN convolutions on and YNNPACK off, given to the run's
  own jitted programs only (never through XLA_FLAGS, so no other program and no other platform sees them);
- glibc malloc settings (`malloc.py`) that stop XLA:CPU page-faulting its scratch buffers in anew at every call,
  applied by the entry points before JAX starts its threads.

GPUs and TPUs run flax's layers with autodiff and XLA's defaults. One config field chooses: `cpu_fast_paths`
= 'auto' (on exactly when the devices of the run's mesh are CPUs), 'on' or 'off'. Both settings give the same
numbers up to float rounding (`tests/cpu_fast_paths_test.py`). Importing this package changes nothing.
"""
from __future__ import annotations

from collections.abc import Iterable

SETTINGS = ("auto", "on", "off")


def check_setting(setting: str) -> str:
  if setting not in SETTINGS:
    raise ValueError(f"cpu_fast_paths must be one of {SETTINGS}, got {setting!r}.")
  return setting


def enabled(setting: str, platforms: Iterable[str]) -> bool:
  """Whether the fast paths are on for a run whose devices are of `platforms` ('cpu', 'gpu', 'tpu', 'cuda', ...):
  'auto' turns them on exactly when every device is a CPU."""
  if check_setting(setting) != "auto":
    return setting == "on"
  platforms = set(platforms)
  return bool(platforms) and platforms == {"cpu"}


def platforms_of(mesh) -> set[str]:
  """The platforms of the devices of a mesh."""
  return {device.platform for device in mesh.devices.flat}
