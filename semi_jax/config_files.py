"""Config files loaded by path, from any working directory.

A config file such as `configs/cifar10_lt.py` imports the package it sits in (`from configs import default`).
Python finds that package only while the directory above it is on sys.path, which holds when a command runs in
the repository root and nowhere else. `make_importable(path)` adds the directory above the file's package, the
first directory upwards without an `__init__.py`, so `--config=/anywhere/configs/x.py` works from any working
directory. Nothing inside semi_jax imports the repository's `configs` package; the entry points take a path.

A config file chooses its epoch length, warm-up, bank decay interval and schedule windows for its own
train.total_steps. A shorter run, by the config argument `steps=N` (`configs/default.apply_args`) or by
`--config.train.total_steps=N` (`fit_to_length`, which the commands call after parsing their flags), gets them
scaled by one rule, `length_tied_values`, so that a smoke run of any config file is valid and keeps the file's shape.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys

import ml_collections

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
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


def _config_specs(argv) -> list[str]:
  """The --config values of a command line."""
  specs = []
  for i, arg in enumerate(argv):
    spec = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if spec:
      specs.append(spec)
  return specs


def flag_spec(argv) -> str:
  """The --config value of a command line (path.py[:arg]), as given."""
  specs = _config_specs(argv)
  if not specs:
    raise ValueError("no --config given; e.g. --config=configs/digits_lt.py")
  return specs[-1]


def make_argv_configs_importable(argv) -> None:
  """`make_importable` for every config file given with --config in a command line (before absl parses it)."""
  for spec in _config_specs(argv):
    make_importable(split_spec(spec)[0])


def parse_flags(flag_values, argv, program: str, usage=None):
  """absl flag parsing for a command with a --config flag: the config's package importable from any directory,
  and config mistakes reported in one line instead of a traceback."""
  from absl import flags
  if usage is not None and any(arg in HELP_FLAGS for arg in argv[1:]):
    print(usage())  # the command's own help, not absl's flag list (which exits 1)
    sys.exit(0)
  make_argv_configs_importable(argv)
  try:
    rest = flag_values(argv)
    if "config" in flag_values and flag_values["config"].value is not None:
      # ml_collections keeps a failed load as a value that raises at its first use: make that use here.
      getattr(flag_values["config"].value, "to_dict")
    return rest
  except OSError as e:  # ml_collections: the config file cannot be read
    missing = [spec for spec in _config_specs(argv) if not os.path.isfile(split_spec(spec)[0])]
    detail = (f"config file {split_spec(missing[0])[0]!r} does not exist" if missing else
              str(e).splitlines()[0])
    sys.exit(f"{program}: bad configuration: {detail}. The config files are in configs/ (e.g. "
             "--config=configs/digits_lt.py); see docs/config.md.")
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = str(e)
    if "Traceback" in message:  # an error raised inside the config file: keep its last line
      message = [line for line in message.splitlines() if line.strip()][-1]
    message = message.strip("'\"").replace("\\'", "'").replace("\\n", " ")
    sys.exit(f"{program}: bad configuration: {message}\n"
             "Every field is declared in configs/default.py (see docs/config.md); config "
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

# --- fitting a configuration to the length of its run ----------------------------------------------------------

# The keys of a schedule that are step counts over the run, by the kinds that read them (and warmup_steps: all).
_WINDOW_KEYS = {
    "constant": (),
    "linear": ("start_step", "steps"),
    "cosine": ("start_step", "steps"),
    "exponential": ("start_step", "every"),
    "step": ("start_step", "every"),
    "reference_cosine": ("steps",),
    "reference_ramp": (),
}
# Schedules whose values are step counts within an epoch: they scale with train.steps_per_epoch.
_EPOCH_SCHEDULES = ("bank.decay_every",)


def _get(config, path: str):
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _set(config, path: str, value) -> None:
  parent, _, leaf = path.rpartition(".")
  (_get(config, parent) if parent else config)[leaf] = value


def _leaves(config, prefix: str = "") -> dict:
  """{dotted.path: value} of every field that is not a group."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def schedule_paths(config, prefix: str = "") -> list[str]:
  """The dotted paths of every schedule group of `config` (a ConfigDict with exactly the schedule keys)."""
  from semi_jax import schedules  # here: importing this module starts no JAX
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      if set(value.keys()) == set(schedules.FIELD_TYPES):
        paths.append(prefix + key)
      else:
        paths.extend(schedule_paths(value, f"{prefix}{key}."))
  return paths


def length_tied_values(base, total_steps: int, steps_per_epoch: int | None = None,
                       kinds: dict | None = None) -> dict:
  """{dotted.path: value} of every field tied to the run length, for a run of `total_steps` made from `base` (the
  config file's configuration at its own train.total_steps).

  A shorter run gets them scaled, so that every value fits it and the run keeps the file's shape: the same number
  of epochs where it can (train.steps_per_epoch scaled down, never below 1: ssl.est_epoch, the class-frequency
  monitor and bank.decay_clock=epoch count in epochs), the bank's decay interval (bank.decay_every, in steps) the
  same fraction of an epoch, the schedule windows (start_step, steps, every, warmup_steps) the same fraction of
  the run; ssl.est_epoch changes only where the SeMi components would otherwise never start. A run as long as the
  file's or longer gets base's own values: they all fit it, and the epoch length stays the file's, fixed as the
  reference's eval_step (a run extended on resume keeps its epoch clock).

  Args:
    base: the configuration the values are scaled from.
    total_steps: the run's length.
    steps_per_epoch: the run's epoch length where it is fixed (set by the user); None: scaled from base's.
    kinds: the kind of each schedule of the run where it differs from base's (it decides which keys are steps).
  """
  t0, s0 = base.train.total_steps, base.train.steps_per_epoch
  shorter = 1 <= total_steps < t0 and s0 >= 1 and (steps_per_epoch is None or steps_per_epoch >= 1)
  if steps_per_epoch is None:
    steps_per_epoch = max(1, s0 * total_steps // t0) if shorter else s0
  values = {"train.steps_per_epoch": steps_per_epoch, "ssl.est_epoch": base.ssl.est_epoch}
  ratio = total_steps / t0 if shorter else 1.0
  spe = steps_per_epoch
  if shorter:
    # The SeMi components run from epoch est_epoch + 1 on: where the run's last epoch would not get there, the
    # warm-up keeps its share of the epochs, at most up to the run's next-to-last epoch.
    last0, last = (t0 - 1) // s0, (total_steps - 1) // spe
    if base.ssl.est_epoch >= last:
      values["ssl.est_epoch"] = max(0, min(base.ssl.est_epoch * (last + 1) // (last0 + 1), last - 1))
  for path in schedule_paths(base):
    cfg = _get(base, path)
    kind = (kinds or {}).get(path, cfg.kind)
    if path in _EPOCH_SCHEDULES:
      for key in ("value", "end_value") if kind in ("linear", "cosine") else ("value",):
        # Rounded down, so that an epoch holds at least as many intervals as in the file's epoch.
        values[f"{path}.{key}"] = max(1.0, float(math.floor(cfg[key] * spe / s0))) if shorter else cfg[key]
    for key in _WINDOW_KEYS.get(kind, ()):
      n = cfg[key]
      if shorter and key == "start_step":
        n = math.floor(n * ratio)  # stays below total_steps when base's start_step is below t0
      elif shorter and n > 0:  # steps 0 (until the end of training) stays 0; every stays >= 1
        n = max(1, round(n * ratio))
      values[f"{path}.{key}"] = n
    if cfg.warmup_steps > 0:
      warmup = min(math.floor(cfg.warmup_steps * ratio), total_steps) if shorter else cfg.warmup_steps
      if shorter and kind == "reference_cosine":  # the warm-up must end before the cosine's horizon
        horizon = values.get(f"{path}.steps", cfg.steps) or total_steps
        warmup = min(warmup, horizon - 1)
      values[f"{path}.warmup_steps"] = warmup
  return values


def fit_lengths(config, base, keep=()) -> list[str]:
  """Sets the fields of `config` tied to the run length (`length_tied_values`) for its train.total_steps, scaled
  from `base`, except the fields in `keep` (set by the user: they stay as set, and validation names any that no
  longer fits). Returns one line per field whose value differs from base's."""
  total, keep = config.train.total_steps, set(keep)
  spe = config.train.steps_per_epoch if "train.steps_per_epoch" in keep else None
  kinds = {path: _get(config, path).kind for path in schedule_paths(config)}
  values = length_tied_values(base, total, spe, kinds)
  spe = values["train.steps_per_epoch"]
  t0, s0 = base.train.total_steps, base.train.steps_per_epoch
  notes = []
  for path, value in values.items():
    if path in keep:
      continue
    if _get(config, path) != value:
      _set(config, path, value)
    if value != _get(base, path):
      notes.append(f"{path}: {_get(base, path)!r} -> {value!r} (fitted to {total} steps in epochs of {spe}; the "
                   f"config file trains {t0} steps in epochs of {s0})")
  return notes


def without_steps(spec: str) -> str:
  """The config spec without its `steps=` argument: the config file at its own length."""
  path, arg = split_spec(spec)
  rest = ",".join(kv for kv in (arg or "").split(",") if kv and not kv.startswith("steps="))
  return f"{path}:{rest}" if rest else path


def fit_to_length(config, spec: str, explicit=()) -> list[str]:
  """Fits the fields of `config` tied to the run length to its train.total_steps (see `length_tied_values`) when
  that was overridden after the config file was loaded (`--config.train.total_steps=N`), as the config argument
  `steps=N` does inside the file; the one rule for both. `spec` is the --config value the config came from
  (`path.py[:arg]`), `explicit` the dotted fields set on the command line (or by a sweep variant): they stay as
  set, as does every field whose value differs from the file's. Returns one line per length-tied field that differs
  from the file's own value (including what `steps=` changed), to be logged."""
  loaded = load(spec)
  base = load(without_steps(spec)) if without_steps(spec) != spec else loaded
  file_values = _leaves(loaded)
  keep = set(explicit) | {path for path, value in _leaves(config).items() if file_values.get(path, value) != value}
  return fit_lengths(config, base, keep)
