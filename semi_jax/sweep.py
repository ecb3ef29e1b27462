"""Runs an ablation sweep: every variant of a sweep file, for every seed, one run after another or together.

  python -m semi_jax.sweep --config=configs/ablations/decay.py[:base=test] --workdir=DIR
      [--seeds=0,1,2] [--only=reference,no_decay] [--print_commands | --together [--run_axis_size=N]]

A sweep file declares `get_config(arg)` (the base configuration), `get_sweep(arg)` (a list of
`(variant name, {dotted.key: value})`) and optionally `SEEDS` (see configs/ablations/__init__.py). Each run
trains in DIR/<variant>/seed_<s> and gets a `sweep_variant.json` (name, overrides, seed, full config) that
`semi_jax.report` reads. A finished run (summary.json at the configured total_steps) is skipped; any other
run is handed to train_and_evaluate, which resumes from its last checkpoint. Every variant's configuration
is built and validated before the first run starts, so a typo in the last variant fails at once.
--print_commands prints one `python -m semi_jax.main ...` command per run instead (for a cluster) and
writes the runs' sweep_variant.json files, so the report can label the results.
--together trains the runs stacked on a leading run axis, as few jitted programs as their structures allow
(semi_jax.together): the plan is printed first, runs of one seed share their input stream, each run still
writes its own DIR/<variant>/seed_<s>, and the stacked checkpoints live in DIR/together/.
DIR may be on a remote file system such as gs:// (see semi_jax.files); the sweep file is local.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import copy
import dataclasses
import difflib
import inspect
import numbers
import os
import re
import shlex
import sys

import ml_collections
import numpy as np

from semi_jax import config_files, config_validation, files

VARIANT_FILE = "sweep_variant.json"
SUMMARY = "summary.json"  # written by semi_jax.train at the end of training
GROUPS_DIR = "together"  # --together: the stacked checkpoints, one directory per group of runs
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One (variant, seed) of a sweep: its configuration and its working directory."""
  variant: str
  index: int  # position of the variant in the sweep file (the report keeps this order)
  seed: int
  overrides: dict  # as declared, made JSON-compatible
  config: ml_collections.ConfigDict
  workdir: str
  config_spec: str  # the sweep file and its argument, as given to --config


def load_sweep_file(path: str):
  """Imports a sweep file by path (like ml_collections' config files) and checks what it declares."""
  if files.is_remote(path):  # imported as Python: the runs' --workdir may be remote, the sweep file not
    raise ValueError(f"sweep file {path!r} must be a local file; copy it here (the --workdir may be on gs://).")
  if not files.isfile(path):
    raise ValueError(f"sweep file {path!r} does not exist; e.g. --config=configs/ablations/decay.py.")
  module = config_files.load_module(path, prefix="semi_jax_sweep_")
  for fn in ("get_config", "get_sweep"):
    if not callable(getattr(module, fn, None)):
      raise ValueError(f"sweep file {path} defines no {fn}(); a sweep file declares get_config(arg=None), "
                       "get_sweep(arg=None) and optionally SEEDS (see configs/ablations/__init__.py).")
  return module


def _call_with_arg(fn, arg):
  return fn(arg) if inspect.signature(fn).parameters else fn()


def jsonable(value):
  """Overrides as plain JSON data: ConfigDicts become dicts, numpy scalars Python numbers."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value


def flatten_overrides(overrides: Mapping, variant: str = "") -> dict:
  """{dotted.key: scalar}: dict values are expanded into one key per field ({"a.b": {"c": 1}} -> {"a.b.c": 1})."""
  where = f"sweep variant {variant!r}: " if variant else ""
  flat = {}

  def visit(key, value):
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      if not value:
        raise ValueError(f"{where}override {key!r} is an empty dict; give the fields to set.")
      for sub, v in value.items():
        visit(f"{key}.{sub}", v)
      return
    if not isinstance(value, (bool, numbers.Real, str)):
      raise ValueError(f"{where}override {key}={value!r} has type {type(value).__name__}; a value must be a "
                       "bool, number or string, or a dict of them for a group such as a schedule.")
    if key in flat:
      raise ValueError(f"{where}config key {key!r} is set twice (directly and inside a dict); set it once.")
    flat[key] = value

  for key, value in jsonable(overrides).items():
    if not key or any(not part for part in key.split(".")):
      raise ValueError(f"{where}override key {key!r} is not a dotted config path like 'bank.beta.value'.")
    visit(key, value)
  return flat


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping, variant: str = ""):
  """A copy of `config` with the overrides set; unknown keys and wrong types raise ValueError."""
  where = f"sweep variant {variant!r}: " if variant else ""
  config = copy.deepcopy(config)
  for key, value in flatten_overrides(overrides, variant).items():
    if key == "seed":
      raise ValueError(f"{where}override 'seed' is not allowed: seeds are the sweep's own axis "
                       "(SEEDS in the sweep file, or --seeds).")
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      prefix = ".".join(parts[:depth])
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"{where}unknown config key {key!r}: {prefix!r} is a value, not a group of fields.")
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=3)
        hint = f"; did you mean {', '.join(repr('.'.join([*parts[:depth], c])) for c in close)}?" if close else (
            f"; fields of {prefix or 'the config'}: {', '.join(sorted(node.keys()))}.")
        raise ValueError(f"{where}unknown config key {key!r}{hint}")
      if depth < len(parts) - 1:
        node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
      raise ValueError(f"{where}config key {key!r} is a group of fields (e.g. a schedule), not a value; set its "
                       f"fields with a dict, {{{key!r}: {{'value': {value!r}}}}}, or the key {key + '.value'!r}.")
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise ValueError(f"{where}config key {key!r} cannot take {value!r}: {e}") from None
  return config


def plan(config_spec: str, workdir: str, seeds: Sequence[int] | None = None,
         only: Sequence[str] | None = None) -> list[SweepRun]:
  """Builds and validates the configuration of every (variant, seed) before anything runs."""
  path, arg = config_files.split_spec(config_spec)
  module = load_sweep_file(path)
  base = _call_with_arg(module.get_config, arg)
  variants = _call_with_arg(module.get_sweep, arg)
  _check_variants(variants, path)
  names = [name for name, _ in variants]
  if only:
    unknown = [n for n in only if n not in names]
    if unknown:
      raise ValueError(f"--only names unknown variants {unknown}; {path} declares {names}.")
  seeds = _check_seeds(getattr(module, "SEEDS", (0,)) if seeds is None else seeds)
  runs = []
  for index, (name, overrides) in enumerate(variants):
    if only and name not in only:
      continue
    config = apply_overrides(base, overrides, name)  # fails on the first unknown key, naming it and the variant
    for seed in seeds:
      run_config = copy.deepcopy(config)
      run_config.seed = seed
      try:
        config_validation.validate(run_config)
      except ValueError as e:
        raise ValueError(f"sweep variant {name!r} (seed {seed}): {e}") from None
      run_config.lock()
      runs.append(SweepRun(variant=name, index=index, seed=seed, overrides=jsonable(overrides),
                           config=run_config, workdir=files.join(workdir, name, f"seed_{seed}"),
                           config_spec=config_spec))
  return runs


def _check_variants(variants, path: str) -> None:
  if not isinstance(variants, Sequence) or not variants:
    raise ValueError(f"{path}: get_sweep() must return a non-empty list of (name, overrides dict) pairs.")
  seen = set()
  for item in variants:
    if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[1], Mapping)):
      raise ValueError(f"{path}: get_sweep() item {item!r} is not a (name, overrides dict) pair.")
    name = item[0]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise ValueError(f"{path}: variant name {name!r} must be a directory name of letters, digits and _.+- "
                       "(starting with a letter or digit).")
    if name == GROUPS_DIR:
      raise ValueError(f"{path}: variant name {name!r} is reserved (--together keeps its checkpoints there).")
    if name in seen:
      raise ValueError(f"{path}: variant name {name!r} appears twice; names must be unique.")
    seen.add(name)


def _check_seeds(seeds) -> list[int]:
  seeds = list(seeds)
  if not seeds or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in seeds):
    raise ValueError(f"seeds {seeds!r} are invalid; give non-negative integers, e.g. --seeds=0,1,2.")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds {seeds!r} repeat a seed; give each once.")
  return [int(s) for s in seeds]


def variant_record(run: SweepRun) -> dict:
  """The content of a run's sweep_variant.json."""
  path, arg = config_files.split_spec(run.config_spec)
  return {"name": run.variant, "index": run.index, "seed": run.seed, "overrides": run.overrides,
          "config_file": path, "config_arg": arg, "config": run.config.to_dict()}


def check_workdirs(runs: Sequence[SweepRun]) -> None:
  """Refuses to reuse a directory that holds another variant's run (other overrides or seed)."""
  for run in runs:
    # A variant file cut short counts as absent; the run rewrites it when it starts.
    old = files.read_json(files.join(run.workdir, VARIANT_FILE), strict=False)
    if old is None:
      continue
    if (old.get("name"), old.get("seed"), old.get("overrides")) != (run.variant, run.seed, run.overrides):
      raise ValueError(
          f"{run.workdir} holds a run of variant {old.get('name')!r} seed {old.get('seed')} with overrides "
          f"{old.get('overrides')}, but the sweep now declares {run.variant!r} seed {run.seed} with "
          f"{run.overrides}: use another --workdir or delete that directory.")


def write_variant_file(run: SweepRun) -> None:
  files.makedirs(run.workdir)
  files.write_json_atomic(files.join(run.workdir, VARIANT_FILE), variant_record(run))


def is_finished(run: SweepRun) -> bool:
  """True when the run's summary.json reports the configured number of steps."""
  summary = _read_summary(run)
  return isinstance(summary, dict) and summary.get("step") == run.config.train.total_steps


def _read_summary(run: SweepRun):
  # A summary cut short (a run killed while writing it) counts as missing: the run resumes and rewrites it.
  return files.read_json(files.join(run.workdir, SUMMARY), strict=False)


def _skip(run: SweepRun, head: str, lead: bool, log) -> dict:
  """The result of a finished run, which is not trained again (its variant file rewritten where missing)."""
  log(f"{head}: finished, skipped ({run.workdir})")
  if lead and not files.exists(files.join(run.workdir, VARIANT_FILE)):
    write_variant_file(run)
  return {"variant": run.variant, "seed": run.seed, "workdir": run.workdir, "status": "skipped",
          "summary": _read_summary(run)}


def run_sweep(runs: Sequence[SweepRun], log=print) -> list[dict]:
  """Trains every unfinished run in order; returns one {variant, seed, workdir, status, summary} per run."""
  import jax
  from semi_jax import train  # imported here: planning and --print_commands need no TensorFlow

  check_workdirs(runs)
  lead = jax.process_index() == 0  # the only process that writes files
  results = []
  for i, run in enumerate(runs, 1):
    head = f"[{i}/{len(runs)}] {run.variant} seed {run.seed}"
    if is_finished(run):
      results.append(_skip(run, head, lead, log))
      continue
    log(f"{head}: training to step {run.config.train.total_steps} in {run.workdir}")
    if lead:
      write_variant_file(run)
    summary = train.train_and_evaluate(run.config, run.workdir)
    preempted = bool(summary.get("preempted"))
    results.append({"variant": run.variant, "seed": run.seed, "workdir": run.workdir,
                    "status": "preempted" if preempted else "trained", "summary": summary})
    if preempted:  # the run saved its checkpoint; starting the next one would only lose it to the kill
      log(f"{head}: stopped by a signal at step {summary['step']}; the remaining runs were not started. Rerun "
          "the same command to continue the sweep.")
      break
  return results


def run_together(runs: Sequence[SweepRun], workdir: str, run_axis_size: int = -1, log=print) -> list[dict]:
  """Trains the unfinished runs stacked: grouped by program structure (semi_jax.together), one program per
  group over every device; returns one {variant, seed, workdir, status, summary} per run, like `run_sweep`."""
  import jax
  from semi_jax import together

  check_workdirs(runs)
  lead = jax.process_index() == 0  # the only process that writes files
  results, pending = [], []
  for run in runs:
    if is_finished(run):
      results.append(_skip(run, f"{run.variant} seed {run.seed}", lead, log))
    else:
      pending.append(run)
  groups = [[pending[i] for i in g] for g in together.plan_groups([r.config for r in pending])]
  members = [[together.Member(r.config, r.workdir, f"{r.variant} seed {r.seed}") for r in g] for g in groups]
  shapes = [together.choose_axes(jax.device_count(), len(g), g[0].config.train.batch_size, run_axis_size,
                                 jax.local_device_count()) for g in groups]
  if groups:
    log(f"Training {len(pending)} runs together in {len(groups)} program(s) on {jax.device_count()} devices:\n"
        + together.describe_plan(members, shapes))
  for k, (group, group_members, (r, d)) in enumerate(zip(groups, members, shapes)):
    log(f"[group {k + 1}/{len(groups)}] {len(group)} runs, mesh run {r} x data {d}")
    for run in group:
      if lead:
        write_variant_file(run)
    trainer = together.GroupTrainer(group_members, files.join(workdir, GROUPS_DIR, together.group_name(
        group_members)), together.make_mesh(r, d))
    summaries = trainer.run()
    preempted = any(s.get("preempted") for s in summaries)
    results += [{"variant": run.variant, "seed": run.seed, "workdir": run.workdir,
                 "status": "preempted" if preempted else "trained", "summary": s}
                for run, s in zip(group, summaries)]
    if preempted:
      log(f"[group {k + 1}/{len(groups)}] stopped by a signal at step {summaries[0]['step']}; the remaining groups "
          "were not started. Rerun the same command to continue the sweep.")
      break
  order = {(r.variant, r.seed): i for i, r in enumerate(runs)}
  return sorted(results, key=lambda r: order[(r["variant"], r["seed"])])


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def override_flags(overrides: Mapping) -> list[str]:
  """`--config.k=v` flags of semi_jax.main; a dict value becomes one flag per field."""
  return [f"--config.{key}={_flag_value(value)}" for key, value in flatten_overrides(overrides).items()]


def launch_command(run: SweepRun, python: str = "python") -> str:
  """The shell command that trains this run with semi_jax.main."""
  args = [python, "-m", "semi_jax.main", f"--config={run.config_spec}", f"--workdir={run.workdir}",
          f"--config.seed={run.seed}", *override_flags(run.overrides)]
  return shlex.join(args)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("config", None, "Sweep file with its argument, e.g. configs/ablations/decay.py:base=test.")
  flags.DEFINE_string("workdir", None, "Sweep directory; each run trains in WORKDIR/<variant>/seed_<s>.")
  flags.DEFINE_list("seeds", None, "Seeds of every variant (default: the sweep file's SEEDS, else 0).")
  flags.DEFINE_list("only", None, "Run only these variants (comma-separated names).")
  flags.DEFINE_bool("print_commands", False, "Print one semi_jax.main command per run instead of training.")
  flags.DEFINE_bool("together", False, "Train the runs stacked, as few programs as their structures allow "
                    "(semi_jax.together), instead of one after another.")
  flags.DEFINE_integer("run_axis_size", -1, "--together: devices on the mesh's run axis (the rest form the "
                       "data axis); -1 chooses.")
  flags.mark_flags_as_required(["config", "workdir"])
  return flags.FLAGS


def main(argv, flag_values) -> None:
  if len(argv) > 1:
    sys.exit(f"semi_jax.sweep: unexpected arguments {argv[1:]}")
  if flag_values.print_commands and flag_values.together:
    sys.exit("semi_jax.sweep: --print_commands prints one command per run, --together trains them as one program; "
             "give one of them.")
  try:  # mistakes in the sweep declaration: one clear line, before anything trains
    seeds = None if flag_values.seeds is None else _parse_seeds(flag_values.seeds)
    if not flag_values.print_commands:
      _prepare_training(flag_values.config)
    runs = plan(flag_values.config, flag_values.workdir, seeds=seeds, only=flag_values.only)
    check_workdirs(runs)
  except ValueError as e:
    sys.exit(f"semi_jax.sweep: {e}")
  if flag_values.print_commands:
    for run in runs:
      write_variant_file(run)
      print(launch_command(run))
    return
  from semi_jax import checkpointing
  try:
    if flag_values.together:
      results = run_together(runs, flag_values.workdir, flag_values.run_axis_size)
    else:
      results = run_sweep(runs)
  except (ValueError, FloatingPointError, checkpointing.CheckpointIOError) as e:
    sys.exit(f"semi_jax.sweep: {type(e).__name__}: {e}")
  print(f"\n{len(results)} runs in {flag_values.workdir}:")
  for r in results:
    s = r["summary"] or {}
    print(f"  {r['variant']:<20} seed {r['seed']:<3} {r['status']:<8} step {s.get('step')} "
          f"balanced acc {s.get('balanced_acc', float('nan')):.2f}")
  print(f"Report: python -m semi_jax.report --workdir={flag_values.workdir}")


def _prepare_training(config_spec: str) -> None:
  """What must happen before JAX starts (planning validates schedules with JAX): the CPU set-up of the sweep's
  base configuration (semi_jax.startup) and, on a multi-process job,
  jax.distributed."""
  from semi_jax import distributed, startup
  path, arg = config_files.split_spec(config_spec)
  startup.prepare(_call_with_arg(load_sweep_file(path).get_config, arg).cpu_fast_paths)
  distributed.maybe_initialize()


def _parse_seeds(items) -> list[int]:
  try:
    return [int(s) for s in items]
  except ValueError:
    raise ValueError(f"--seeds={','.join(items)} is invalid; give integers, e.g. --seeds=0,1,2.") from None


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import app
  FLAGS = _define_flags()
  app.run(lambda argv: main(argv, FLAGS))
