"""The --help of the commands: what to pass, the config files there are, and the fields users change most.

absl's own --help lists flags only (and exits 1): `--config` and `--workdir` say nothing of the config files, their
arguments or their fields. These texts do, read from the files themselves (each file's first docstring line, the
default of each field), so they cannot go stale.
"""
from __future__ import annotations

import ast
import os

from semi_jax import config_files

ARGUMENTS = ("algo=fixmatch|fixmatch_la|acr|semi (default semi), miner=|bank=|plce=|cons=on|off (component ablations), "
             "dist=consistent|uniform|reversed (unlabeled distribution), imb=RATIO (both imbalance ratios), seed=N, "
             "steps=N (a shorter run scales the epoch length, warm-up and decay intervals)")
# The fields users change most, with a word on each; docs/config.md has every field.
MOST_USED = (("train.total_steps", "optimisation steps"), ("train.batch_size", "labeled images per step, global"),
             ("optim.lr", "peak SGD learning rate"), ("model.dtype", "float32 | bfloat16 (use bfloat16 on TPUs)"),
             ("data.data_dir", "where the prepared TFDS data sets are (also gs://)"),
             ("data.augment_on", "host | device | auto: where the views are made"),
             ("train.eval_every_steps", "evaluation interval"), ("train.checkpoint_every_steps", "checkpoint interval"),
             ("train.skip_nonfinite_steps", "skip NaN/Inf steps instead of stopping"),
             ("bank.beta.kind", "a schedule: --config.bank.beta.kind=exponential --config.bank.beta.rate=0.5 ..."),
             ("allow_config_change", "resume a workdir with other values"))


def describe_files(directory: str) -> list[tuple[str, str]]:
  """(name, first line of its docstring) of the config files in `directory`."""
  out = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    if not name.endswith(".py") or name == "__init__.py":
      continue
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    out.append((name, doc.splitlines()[0] if doc else ""))
  return out


def _fields() -> list[str]:
  """The MOST_USED fields with their defaults in configs/default.py of this checkout."""
  try:
    config = config_files.load(config_files.repo_config("default"))
  except ValueError:
    config = None
  lines = []
  for field, text in MOST_USED:
    default = ""
    if config is not None:
      node = config
      for part in field.split("."):
        node = node[part]
      default = f" (default {node!r})"
    lines.append(f"  --config.{field:<30}{text}{default}")
  return lines


def main_usage() -> str:
  configs = config_files.REPO_CONFIGS
  files = [f"  {name:<24}{doc}" for name, doc in describe_files(configs)]
  return "\n".join([
      "python -m semi_jax.main --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE ...]", "",
      "Trains one run of SeMi (or FixMatch, FixMatch+LA, ACR) and evaluates it; rerunning the same command resumes "
      "from the newest checkpoint in DIR (local or gs://).", "",
      f"Config files ({configs}):", *files, "",
      "Config arguments, after ':' and comma-separated (e.g. --config=configs/cifar10_lt.py:algo=acr,dist=reversed):",
      f"  {ARGUMENTS}", "",
      "Most used fields (any field: --config.GROUP.FIELD=VALUE; every field with its default: docs/config.md):",
      *_fields(), "",
      "Flags: --config, --workdir; absl's --verbosity=1 for more logging. Example:",
      "  python -m semi_jax.main --config=configs/digits_lt.py --workdir=workdirs/digits_lt", ""])


def sweep_usage() -> str:
  ablations = os.path.join(config_files.REPO_CONFIGS, "ablations")
  files = [f"  {name:<24}{doc}" for name, doc in describe_files(ablations)]
  return "\n".join([
      "python -m semi_jax.sweep --config=configs/ablations/FILE.py[:ARGS] --workdir=DIR [--seeds=0,1,2] "
      "[--only=A,B] [--together] [--config.FIELD=VALUE ...]", "",
      "Trains every variant of a sweep file for every seed, each in DIR/<variant>/seed_<s>; finished runs are skipped "
      "and interrupted ones resume, so the same command continues a sweep. Then: python -m semi_jax.report "
      "--workdir=DIR.", "",
      f"Sweep files ({ablations}):", *files,
      "  Their argument base=NAME picks the base config (configs/NAME.py, default digits_lt_reversed), followed by "
      "that file's own arguments, e.g. :base=cifar10_lt,dist=reversed.", "",
      "Flags:",
      "  --seeds=0,1,2         seeds of every variant (default: the sweep file's SEEDS)",
      "  --only=A,B            only these variants",
      "  --together            train the runs stacked, as few programs as their structures allow (one accelerator "
      "or slice)",
      "  --run_axis_size=N     --together: devices on the run axis (default: chosen)",
      "  --retry_failed        train runs that diverged in an earlier start again",
      "  --print_commands      print one semi_jax.main command per run instead of training (for a cluster)",
      "  --config.FIELD=VALUE  set a field in every variant (e.g. --config.data.data_dir=gs://BUCKET/tfds "
      "--config.model.dtype=bfloat16); refused for a field a variant sets",
      "", "Most used fields (docs/config.md has every field):", *_fields(), ""])
