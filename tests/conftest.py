"""Test set-up: 8 fake CPU devices, so every sharded code path really runs.

The environment must be set before jax is imported anywhere.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

# Compile fast: the tests check numbers, not speed.
jax.config.update("jax_threefry_partitionable", True)
