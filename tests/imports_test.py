"""Importing semi_jax changes nothing: no environment variable, no JAX setting, no backend started.

Checked in a fresh interpreter with a clean environment (no XLA_FLAGS), importing every module of the package
after the libraries it builds on: importing TensorFlow sets a few variables of its own (TF2_BEHAVIOR,
KMP_INIT_AT_FORK, ...), which are not semi_jax's doing.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_IMPORT_EVERYTHING = """
import json, os, pkgutil, importlib
import clu.metric_writers, flax, jax, ml_collections, optax, orbax.checkpoint, tensorflow, tensorflow_datasets
from jax._src import xla_bridge
before_env = dict(os.environ)
before_config = {k: repr(v) for k, v in jax.config.values.items()}
import semi_jax
modules = sorted(m.name for m in pkgutil.walk_packages(semi_jax.__path__, "semi_jax."))
for name in modules:
  importlib.import_module(name)
after_config = {k: repr(v) for k, v in jax.config.values.items()}
print("RESULT " + json.dumps({
    "modules": modules,
    "env_changed": sorted(k for k in set(before_env) | set(os.environ) if before_env.get(k) != os.environ.get(k)),
    "config_changed": sorted(k for k in before_config if before_config[k] != after_config.get(k)),
    "backends_started": sorted(xla_bridge._backends)}))
"""


def test_importing_every_module_changes_no_environment_variable_and_no_jax_setting():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TF_", "SEMI_JAX"))}
  env["PYTHONPATH"] = ROOT
  r = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
  # Every part of the package was imported, the CPU fast paths and the tools included.
  for name in ("semi_jax.main", "semi_jax.train", "semi_jax.cpu.compiler_options", "semi_jax.cpu.malloc",
               "semi_jax.tools.bench", "semi_jax.tools.export_check", "semi_jax.objective", "semi_jax.semi_state"):
    assert name in result["modules"]
  assert result["env_changed"] == []
  assert result["config_changed"] == []
  assert result["backends_started"] == []
