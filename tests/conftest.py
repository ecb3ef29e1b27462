"""Test set-up: 8 fake CPU devices, so every sharded code path really runs.

The environment must be set before jax is imported anywhere.
"""
import os

# oneDNN convolutions off (semi_jax turns them on by default): XLA cannot serialise programs that call them, so
# the persistent compilation cache below could not store them and the suite would take twice as long. The
# default flags are tested in a subprocess (tests/conv_test.py).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_experimental_onednn_custom_call=false"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# glibc's malloc defaults where the suite calls the entry points (bench.main, semi_jax.main in subprocesses):
# their one-arena setting slows compilation, and the suite compiles much and runs little (tests/host_malloc_test.py
# checks the setting itself).
os.environ["SEMI_JAX_HOST_MALLOC"] = "default"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

# Compile fast: the tests check numbers, not speed.
jax.config.update("jax_threefry_partitionable", True)
# Tests check numbers, not speed: skip most XLA optimisation passes, and reuse compiled programs across the
# many identical jits of the suite (each Trainer compiles afresh otherwise).
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("TMPDIR", "/tmp"), "semi_jax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
