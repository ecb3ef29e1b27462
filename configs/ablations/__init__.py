"""Ablation sweeps: config files that declare a base configuration and named sets of overrides.

A sweep file (decay.py, components.py) defines
  get_config(arg=None)  the base configuration. The argument `base=<name>` picks configs/<name>.py (default
                        digits_lt_reversed, the embedded setting where methods differ most); its other
                        items go to that file, e.g. `:base=cifar10_lt,dist=reversed`.
  get_sweep(arg=None)   [(variant name, {dotted.key: value, ...}), ...]. A value may be a dict (or a
                        ConfigDict), which sets those fields of a group and keeps the others, e.g.
                        {"bank.beta": {"kind": "linear", "value": 0.95, "end_value": 0.999}}. A get_sweep that
                        also takes `config` gets the base config with the command line's --config.* overrides.
  SEEDS                 the seeds every variant runs with (the runner's --seeds replaces them).
`python -m semi_jax.sweep --config=configs/ablations/decay.py:base=test --workdir=DIR` runs the sweep;
`semi_jax.main` also accepts a sweep file as --config, which trains its base configuration.
"""
import importlib
import os

DEFAULT_BASE = "digits_lt_reversed"
_CONFIG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_names() -> list[str]:
  """The configuration files a sweep can start from (configs/*.py)."""
  return sorted(f[:-3] for f in os.listdir(_CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")


def split_base(arg: str | None, default: str = DEFAULT_BASE) -> tuple[str, str | None]:
  """Splits `base=<name>` out of a config argument; returns (base name, the remaining argument or None)."""
  items = [kv for kv in (arg or "").split(",") if kv]
  bases = [kv.split("=", 1)[1] for kv in items if kv.startswith("base=")]
  if len(bases) > 1:
    raise ValueError(f"config argument {arg!r} names base= {len(bases)} times; give it once.")
  rest = ",".join(kv for kv in items if not kv.startswith("base="))
  return (bases[0] if bases else default), (rest or None)


def base_config(arg: str | None = None, default: str = DEFAULT_BASE):
  """The configuration of configs/<base>.py with the rest of the argument applied by that file."""
  base, rest = split_base(arg, default)
  names = base_names()
  if base not in names:
    raise ValueError(f"unknown sweep base {base!r} (argument base=); choose one of {names}, "
                     "e.g. --config=configs/ablations/decay.py:base=test.")
  return importlib.import_module(f"configs.{base}").get_config(rest)
