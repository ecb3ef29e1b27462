"""Test set-up: 8 fake CPU devices, so every sharded code path really runs.

The environment must be set before jax is imported anywhere. Subprocesses of the tests inherit it.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Tests check numbers, not speed: skip most XLA optimisation passes, and reuse compiled programs across the
# many identical jits of the suite (each Trainer compiles afresh otherwise). Programs with XLA:CPU's oneDNN calls
# (the CPU fast paths' compiler options) cannot be serialised and are compiled afresh, with a warning.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("TMPDIR", "/tmp"), "semi_jax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def ram_dir():
  """A fresh directory on TF's in-memory ram:// file system (a stand-in for gs:// offline), removed afterwards."""
  from semi_jax import files
  path = f"ram://semi-jax-{uuid.uuid4().hex}"
  yield path
  if files.exists(path):
    files._gfile().rmtree(path)
