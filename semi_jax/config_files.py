"""Config files loaded by path, from any working directory.

A config file such as `configs/cifar10_lt.py` imports the package it sits in (`from configs import default`).
Python finds that package only while the directory above it is on sys.path, which holds when a command runs in
the repository root and nowhere else. `make_importable(path)` adds the directory above the file's package, the
first directory upwards without an `__init__.py`, so `--config=/anywhere/configs/x.py` works from any working
directory. Nothing inside semi_jax imports the repository's `configs` package; the entry points take a path.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

# The configs of a source checkout (`pip install -e .` or PYTHONPATH): the benchmarks' default settings.
REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/ablations/decay.py:base=test' -> ('configs/ablations/decay.py', 'base=test')."""
  path, sep, arg = spec.partition(".py:")
  return (path + ".py", arg or None) if sep else (spec, None)


def package_root(path: str) -> str:
  """The directory from which the package holding `path` imports: the first one upwards without __init__.py."""
  directory = os.path.dirname(os.path.abspath(path))
  while os.path.isfile(os.path.join(directory, "__init__.py")) and os.path.dirname(directory) != directory:
    directory = os.path.dirname(directory)
  return directory


def make_importable(path: str) -> None:
  """Puts `package_root(path)` on sys.path (first), unless it is there already."""
  root = package_root(path)
  if root not in (os.path.abspath(p or os.curdir) for p in sys.path):
    sys.path.insert(0, root)


def make_argv_configs_importable(argv) -> None:
  """`make_importable` for every config file given with --config in a command line (before absl parses it)."""
  for i, arg in enumerate(argv):
    spec = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if spec:
      make_importable(split_spec(spec)[0])


def parse_flags(flag_values, argv, program: str):
  """absl flag parsing for a command with a --config flag: the config's package importable from any directory,
  and config mistakes reported in one line instead of a traceback."""
  from absl import flags
  make_argv_configs_importable(argv)
  try:
    return flag_values(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = str(e)
    if "Traceback" in message:  # an error raised inside the config file: keep its last line
      message = [line for line in message.splitlines() if line.strip()][-1]
    message = message.strip("'\"").replace("\\'", "'").replace("\\n", " ")
    sys.exit(f"{program}: bad configuration: {message}\n"
             "Every field is declared in configs/default.py (see the README's config reference); config "
             "arguments are e.g. --config=configs/cifar10_lt.py:algo=acr,dist=reversed.")


def load_module(path: str, prefix: str = "semi_jax_config_"):
  """Imports the Python file `path` as a module (its package importable, see `make_importable`)."""
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist.")
  make_importable(path)
  name = prefix + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str):
  """The config of `path.py[:arg]`, as `--config` gives it to semi_jax.main: the file's get_config(arg)."""
  path, arg = split_spec(spec)
  module = load_module(path)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path} defines no get_config(arg=None).")
  return module.get_config(arg) if arg is not None else module.get_config()


def repo_config(name: str) -> str:
  """The path of configs/<name>.py of this source checkout, or a clear error where there is none."""
  path = os.path.join(REPO_CONFIGS, f"{name}.py")
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist (semi_jax is not running from a source checkout); pass the config "
                     "file explicitly with --config=PATH.")
  return path
