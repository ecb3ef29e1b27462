"""Runs an ablation sweep: every variant of a sweep file, for every seed, one run after another or together.

  python -m semi_jax.sweep --config=configs/ablations/decay.py[:base=test] --workdir=DIR
      [--seeds=0,1,2] [--only=reference,no_decay] [--print_commands | --together [--run_axis_size=N]]
      [--retry_failed] [--config.FIELD=VALUE ...]   (--help says more)

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
import json
import numbers
import os
import re
import shlex
import sys

import ml_collections
import numpy as np
from absl import logging

from semi_jax import config_files, config_validation, files, schedules
from semi_jax.outputs import CONFIG_FILE, DIVERGED, FINISHED, SUMMARY

VARIANT_FILE = "sweep_variant.json"
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
  common: dict = dataclasses.field(default_factory=dict)  # --config.* overrides of every variant, flattened


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


def schedule_path(config: dict | None, key: str) -> str | None:
  """The schedule a dotted override key belongs to ('bank.beta.value' -> 'bank.beta') in `config` (JSON data),
  else None."""
  node, parts = config, key.split(".")
  for depth in range(len(parts) + 1):
    if isinstance(node, dict) and set(node) == set(schedules.FIELD_TYPES):
      return ".".join(parts[:depth])
    if depth == len(parts) or not isinstance(node, dict) or parts[depth] not in node:
      return None
    node = node[parts[depth]]
  return None


def config_at(config: dict, path: str):
  """The value of a dotted path in a configuration as JSON data (sweep_variant.json's "config")."""
  for part in path.split("."):
    config = config[part]
  return config


def swept_schedules(config: dict | None, overrides: Mapping) -> list[str]:
  """The schedules a variant's overrides change (of `config`, its configuration as JSON data), in order of
  appearance."""
  paths = [schedule_path(config, key) for key in flatten_overrides(overrides)]
  return list(dict.fromkeys(p for p in paths if p))


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


def plan(config_spec: str, workdir: str, seeds: Sequence[int] | None = None, only: Sequence[str] | None = None,
         common: Mapping | None = None) -> list[SweepRun]:
  """Builds and validates the configuration of every (variant, seed) before anything runs. `common`: overrides
  of every variant (the command line's --config.FIELD=VALUE), refused for a field that a variant sets."""
  path, arg = config_files.split_spec(config_spec)
  module = load_sweep_file(path)
  common = flatten_overrides(common or {}, "the command line")
  base = apply_overrides(_call_with_arg(module.get_config, arg), common, "the command line")
  variants = _get_sweep(module, arg, base)
  _check_variants(variants, path)
  names = [name for name, _ in variants]
  if only:
    unknown = [n for n in only if n not in names]
    if unknown:
      raise ValueError(f"--only names unknown variants {unknown}; {path} declares {names}.")
  _check_common(common, variants)
  seeds = _check_seeds(getattr(module, "SEEDS", (0,)) if seeds is None else seeds)
  runs, notes = [], []
  for index, (name, overrides) in enumerate(variants):
    if only and name not in only:
      continue
    config = apply_overrides(base, overrides, name)  # fails on the first unknown key, naming it and the variant
    # A shorter run (the command line's or a variant's train.total_steps) scales the fields tied to its length.
    explicit = set(common) | set(flatten_overrides(overrides, name))
    notes += [note for note in config_files.fit_to_length(config, config_spec, explicit=explicit) if note not in notes]
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
                           config_spec=config_spec, common=jsonable(common)))
  for note in notes:
    logging.info("sweep: %s", note)
  return runs


def _get_sweep(module, arg, base):
  """The sweep file's variants; a get_sweep(arg, config) is given the base config with the command line's
  overrides, so that values it derives from the base (an interval of a quarter of training) follow them."""
  parameters = inspect.signature(module.get_sweep).parameters
  if "config" in parameters:
    return module.get_sweep(arg, config=base)
  return _call_with_arg(module.get_sweep, arg)


def _check_common(common: dict, variants) -> None:
  """Refuses a command-line override of a field that a variant sets (or a group or member of one)."""
  for name, overrides in variants:
    for key in flatten_overrides(overrides, name):
      clash = [c for c in common if c == key or key.startswith(c + ".") or c.startswith(key + ".")]
      if clash:
        raise ValueError(f"--config.{clash[0]} collides with sweep variant {name!r}, which sets {key}: the sweep "
                         "varies that field. Drop the override, or use --only to leave that variant out.")


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
          "common_overrides": run.common, "config_file": path, "config_arg": arg, "config": run.config.to_dict()}


def check_workdirs(runs: Sequence[SweepRun]) -> None:
  """Refuses to reuse a directory that holds another variant's run (other overrides or seed). A directory where
  no run ever started (neither config.json nor summary.json: e.g. a start that failed) holds nothing to protect."""
  for run in runs:
    # A variant file cut short counts as absent; the run rewrites it when it starts.
    old = files.read_json(files.join(run.workdir, VARIANT_FILE), strict=False)
    started = any(files.exists(files.join(run.workdir, name)) for name in (CONFIG_FILE, SUMMARY))
    if old is None or not started:
      continue
    if (old.get("name"), old.get("seed"), old.get("overrides")) != (run.variant, run.seed, run.overrides):
      raise ValueError(
          f"{run.workdir} holds a run of variant {old.get('name')!r} seed {old.get('seed')} with overrides "
          f"{old.get('overrides')}, but the sweep now declares {run.variant!r} seed {run.seed} with "
          f"{run.overrides}: use another --workdir or delete that directory.")


def write_variant_file(run: SweepRun) -> None:
  """Writes the run's sweep_variant.json, unless it already says the same (so that a second sweep that is then
  refused by the run's lease touches no file of the run that holds it)."""
  path = files.join(run.workdir, VARIANT_FILE)
  record = variant_record(run)
  if files.read_json(path, strict=False) == json.loads(json.dumps(record)):
    return
  files.makedirs(run.workdir)
  files.write_json_atomic(path, record)


def run_status(run: SweepRun) -> str | None:
  """"finished" when the run's summary.json reports the configured number of steps, "diverged" when it reports
  the run stopped as diverged, None otherwise (not started, interrupted, or a summary cut short)."""
  summary = _read_summary(run)
  if not isinstance(summary, dict):
    return None
  if summary.get("status") == DIVERGED:
    return DIVERGED
  if summary.get("status", FINISHED) == FINISHED and summary.get("step") == run.config.train.total_steps:
    return FINISHED
  return None


def is_finished(run: SweepRun) -> bool:
  """True when the run's summary.json reports the configured number of steps."""
  return run_status(run) == FINISHED


def _read_summary(run: SweepRun):
  # A summary cut short (a run killed while writing it) counts as missing: the run resumes and rewrites it.
  return files.read_json(files.join(run.workdir, SUMMARY), strict=False)


def _result(run: SweepRun, status: str, summary) -> dict:
  return {"variant": run.variant, "seed": run.seed, "workdir": run.workdir, "status": status, "summary": summary}


def _skip(run: SweepRun, head: str, lead: bool, log, status: str) -> dict:
  """The result of a run that is not trained again: finished, or failed before (its variant file rewritten where
  missing)."""
  if status == FINISHED:
    log(f"{head}: finished, skipped ({run.workdir})")
  else:
    log(f"{head}: diverged in an earlier start, skipped ({run.workdir}); --retry_failed trains it again")
  if lead and not files.exists(files.join(run.workdir, VARIANT_FILE)):
    write_variant_file(run)
  return _result(run, "skipped" if status == FINISHED else "failed", _read_summary(run))


def failures(results: Sequence[dict]) -> list[dict]:
  """The results of runs that diverged, in this sweep or an earlier one."""
  return [r for r in results if r["status"] in ("diverged", "failed")]


def run_sweep(runs: Sequence[SweepRun], log=print, retry_failed: bool = False) -> list[dict]:
  """Trains every unfinished run in order; returns one {variant, seed, workdir, status, summary} per run. A run
  that diverges is recorded (status diverged) and the sweep goes on with the next run; runs that diverged before
  are not trained again unless `retry_failed` (they resume from their last good checkpoint)."""
  import jax
  from semi_jax import train  # imported here: planning and --print_commands need no TensorFlow

  check_workdirs(runs)
  lead = jax.process_index() == 0  # the only process that writes files
  results = []
  for i, run in enumerate(runs, 1):
    head = f"[{i}/{len(runs)}] {run.variant} seed {run.seed}"
    status = run_status(run)
    if status == FINISHED or (status == DIVERGED and not retry_failed):
      results.append(_skip(run, head, lead, log, status))
      continue
    log(f"{head}: training to step {run.config.train.total_steps} in {run.workdir}")
    if lead:
      write_variant_file(run)
    try:
      summary = train.train_and_evaluate(run.config, run.workdir)
    except FloatingPointError as e:  # the run diverged: recorded in its summary.json; the sweep goes on
      log(f"{head}: diverged ({e})")
      results.append(_result(run, DIVERGED, _read_summary(run)))
      continue
    preempted = bool(summary.get("preempted"))
    results.append(_result(run, "preempted" if preempted else "trained", summary))
    if preempted:  # the run saved its checkpoint; starting the next one would only lose it to the kill
      log(f"{head}: stopped by a signal at step {summary['step']}; the remaining runs were not started. Rerun "
          "the same command to continue the sweep.")
      break
  return results


def existing_groups(runs: Sequence[SweepRun], workdir: str) -> list[list[SweepRun]]:
  """The groups of an earlier --together start of this sweep that are still training (a member neither finished
  nor failed), as their manifests in DIR/together/ list them: they resume as they were, whatever runs were
  added to the sweep since. A group with a member that is not in `runs` is left alone."""
  from semi_jax import together
  root = files.join(workdir, GROUPS_DIR)
  by_key = {(r.workdir, r.seed): r for r in runs}
  groups = []
  for name in (files.listdir(root) if files.isdir(root) else []):
    manifest = files.read_json(files.join(root, name, together.GROUP_FILE), strict=False)
    if not isinstance(manifest, dict):
      continue
    keys = [(m.get("workdir"), m.get("seed")) for m in manifest.get("runs", [])]
    if not keys or any(k not in by_key for k in keys):
      continue
    members = [by_key[k] for k in keys]
    if any(run_status(m) is None for m in members):
      groups.append(members)
  return groups


@dataclasses.dataclass
class TogetherPlan:
  """How --together trains a sweep's unfinished runs: the results of the runs it skips, the groups (each one
  program), their members, meshes and memory estimates."""
  skipped: list
  groups: list
  members: list
  shapes: list
  memory: list
  resumed: int

  def describe(self) -> str:
    from semi_jax import together
    import jax
    head = (f"Training {sum(map(len, self.groups))} runs together in {len(self.groups)} program(s) on "
            f"{jax.device_count()} devices ({self.resumed} group(s) resumed):")
    return head + "\n" + together.describe_plan(self.members, self.shapes, self.memory)


def plan_together(runs: Sequence[SweepRun], workdir: str, run_axis_size: int = -1, log=print,
                  retry_failed: bool = False) -> TogetherPlan:
  """The plan of `run_together`, decided from process 0's view of the sweep directory: groups of an earlier
  start that are still training resume as they were, the other unfinished runs are grouped by structure."""
  import jax
  from semi_jax import distributed, program, together

  check_workdirs(runs)
  lead = jax.process_index() == 0  # the only process that writes files
  resumed = [[r for r in runs if [r.workdir, r.seed] in keys] for keys in distributed.agreed(
      "sweep-groups", [[[m.workdir, m.seed] for m in g] for g in existing_groups(runs, workdir)])]
  resumed = [sorted(g, key=lambda r: runs.index(r)) for g in resumed]
  in_group = {(r.workdir, r.seed) for g in resumed for r in g}
  statuses = distributed.agreed("sweep-status", [run_status(r) for r in runs])
  skipped, pending = [], []
  for run, status in zip(runs, statuses):
    if (run.workdir, run.seed) in in_group:
      continue
    if status == FINISHED or (status == DIVERGED and not retry_failed):
      skipped.append(_skip(run, f"{run.variant} seed {run.seed}", lead, log, status))
    else:
      pending.append(run)
  groups = resumed + [[pending[i] for i in g] for g in together.plan_groups([r.config for r in pending])]
  members = [[together.Member(r.config, r.workdir, f"{r.variant} seed {r.seed}") for r in g] for g in groups]
  platform = program.platform_family({d.platform for d in jax.devices()})
  memory = [together.run_memory(g[0].config) for g in groups]
  device_bytes = together.device_memory_bytes()
  shapes = [together.axes_for(g[0].config, jax.device_count(), len(g), run_axis_size=run_axis_size,
                              devices_per_process=jax.local_device_count(), platform=platform,
                              run_bytes=m["state"] + m["activations"], device_bytes=device_bytes)
            for g, m in zip(groups, memory)]
  return TogetherPlan(skipped, groups, members, shapes, memory, len(resumed))


def describe_together(runs: Sequence[SweepRun], workdir: str, run_axis_size: int = -1,
                      retry_failed: bool = False) -> str:
  """The plan `run_together` prints before training, without training."""
  return plan_together(runs, workdir, run_axis_size, lambda line: None, retry_failed).describe()


def run_together(runs: Sequence[SweepRun], workdir: str, run_axis_size: int = -1, log=print,
                 retry_failed: bool = False) -> list[dict]:
  """Trains the unfinished runs stacked: grouped by program structure (semi_jax.together), one program per
  group over every device; returns one {variant, seed, workdir, status, summary} per run, like `run_sweep`. A
  member that diverges is frozen and recorded (status diverged) while the rest of its group trains on; runs that
  diverged before are not trained again unless `retry_failed` (then from step 0, in a new group)."""
  import jax
  from semi_jax import together

  lead = jax.process_index() == 0  # the only process that writes files
  plan = plan_together(runs, workdir, run_axis_size, log, retry_failed)
  results, groups, members, shapes = list(plan.skipped), plan.groups, plan.members, plan.shapes
  if groups:
    log(plan.describe())
  for k, (group, group_members, (r, d)) in enumerate(zip(groups, members, shapes)):
    log(f"[group {k + 1}/{len(groups)}] {len(group)} runs, mesh run {r} x data {d}")
    for run in group:
      if lead:
        write_variant_file(run)
    trainer = together.GroupTrainer(group_members, files.join(workdir, GROUPS_DIR, together.group_name(
        group_members)), together.make_mesh(r, d))
    summaries = trainer.run()
    preempted = any(s.get("preempted") for s in summaries)
    for run, summary in zip(group, summaries):
      status = "preempted" if preempted and summary.get("status") != DIVERGED else (
          DIVERGED if summary.get("status") == DIVERGED else "trained")
      results.append(_result(run, status, summary))
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
          f"--config.seed={run.seed}", *override_flags(run.common), *override_flags(run.overrides)]
  return shlex.join(args)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  # A config flag: --config.FIELD=VALUE overrides apply to every variant (checked against the sweep's base config).
  config_flags.DEFINE_config_file("config", None, "Sweep file with its argument, e.g. "
                                  "configs/ablations/decay.py:base=test.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Sweep directory; each run trains in WORKDIR/<variant>/seed_<s>.")
  flags.DEFINE_list("seeds", None, "Seeds of every variant (default: the sweep file's SEEDS, else 0).")
  flags.DEFINE_list("only", None, "Run only these variants (comma-separated names).")
  flags.DEFINE_bool("print_commands", False, "Print one semi_jax.main command per run instead of training.")
  flags.DEFINE_bool("together", False, "Train the runs stacked, as few programs as their structures allow "
                    "(semi_jax.together), instead of one after another.")
  flags.DEFINE_integer("run_axis_size", -1, "--together: devices on the mesh's run axis (the rest form the "
                       "data axis); -1 chooses.")
  flags.DEFINE_bool("retry_failed", False, "Train runs that diverged in an earlier start again (one after "
                    "another: from their last good checkpoint; --together: from step 0).")
  flags.mark_flags_as_required(["config", "workdir"])
  return flags.FLAGS


def main(argv, flag_values) -> None:
  from semi_jax import faults
  if len(argv) > 1:
    faults.fail(f"semi_jax.sweep: unexpected arguments {argv[1:]}")
  if flag_values.print_commands and flag_values.together:
    faults.fail("semi_jax.sweep: --print_commands prints one command per run, --together trains them as one "
                "program; give one of them.")
  try:  # mistakes in the sweep declaration: one clear line, before anything trains
    seeds = None if flag_values.seeds is None else _parse_seeds(flag_values.seeds)
    common = dict(getattr(flag_values, "common", None) or {})
    if not flag_values.print_commands:
      _prepare_training(flag_values.config, common)
    runs = plan(flag_values.config, flag_values.workdir, seeds=seeds, only=flag_values.only, common=common)
    check_workdirs(runs)
  except ValueError as e:
    faults.fail(f"semi_jax.sweep: {e}")
  if common and not flag_values.print_commands:
    print("Overrides of every variant: " + " ".join(override_flags(runs[0].common)))
  if flag_values.print_commands:
    for run in runs:
      write_variant_file(run)
      print(launch_command(run))
    return
  retry = bool(getattr(flag_values, "retry_failed", False))
  try:
    if flag_values.together:
      results = run_together(runs, flag_values.workdir, flag_values.run_axis_size, retry_failed=retry)
    else:
      results = run_sweep(runs, retry_failed=retry)
  except Exception as e:  # noqa: BLE001 - every fault ends in one line (faults.describe), the traceback in the log
    faults.exit_with(e, "semi_jax.sweep", flag_values.workdir)
  print(f"\n{len(results)} runs in {flag_values.workdir}:")
  for r in results:
    s = r["summary"] or {}
    print(f"  {r['variant']:<20} seed {r['seed']:<3} {r['status']:<9} step {s.get('step')} "
          f"balanced acc {s.get('balanced_acc', float('nan')):.2f}")
  print(f"Report: python -m semi_jax.report --workdir={flag_values.workdir}")
  failed = failures(results)
  if failed:
    faults.fail(f"semi_jax.sweep: {len(failed)} of {len(results)} runs diverged: "
                + ", ".join(f"{r['variant']} seed {r['seed']}" for r in failed)
                + ". Their summary.json says where; their last good checkpoints are kept. Rerun with "
                  "--retry_failed to train them again.")


def _prepare_training(config_spec: str, common: Mapping) -> None:
  """What must happen before JAX starts (planning validates schedules with JAX): the CPU set-up of the sweep's
  base configuration (semi_jax.startup) and, on a multi-process job, jax.distributed."""
  from semi_jax import distributed, startup
  path, arg = config_files.split_spec(config_spec)
  base = apply_overrides(_call_with_arg(load_sweep_file(path).get_config, arg), common, "the command line")
  startup.prepare(base.cpu_fast_paths)
  distributed.maybe_initialize()


def _parse_seeds(items) -> list[int]:
  try:
    return [int(s) for s in items]
  except ValueError:
    raise ValueError(f"--seeds={','.join(items)} is invalid; give integers, e.g. --seeds=0,1,2.") from None


class _CommandLine:
  """The parsed flags, with the sweep file as given (--config) and its --config.FIELD=VALUE overrides apart."""

  def __init__(self, flag_values, argv):
    from ml_collections import config_flags
    self._flags = flag_values
    self.config = config_files.flag_spec(argv)
    self.common = dict(config_flags.get_override_values(flag_values["config"]))

  def __getattr__(self, name):
    return getattr(self._flags, name)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import app

  from semi_jax import usage
  FLAGS = _define_flags()

  def _main(argv):
    from semi_jax import faults
    faults.capture("semi_jax.sweep")
    main(argv, _CommandLine(FLAGS, sys.argv))

  app.run(_main,
          flags_parser=lambda argv: config_files.parse_flags(FLAGS, argv, "semi_jax.sweep", usage.sweep_usage))
