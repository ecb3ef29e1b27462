"""Lowers a config's train and eval steps for TPU and GPU on this machine: the check to run before booking a pod.

  python -m semi_jax.tools.export_check --config=configs/cifar10_lt.py[:args] [--config.a.b=v ...]
      [--platforms=tpu,cuda] [--devices=8] [--dtypes=float32,bfloat16] [--runs=9] [--conv=auto]

Give it the config and overrides of the run you plan (as to semi_jax.main). It lowers the dtypes of `--dtypes`;
without it, the one of a `--config.model.dtype=` override, or else float32 and bfloat16.

For every dtype and platform, `jax.export` lowers the run's jitted functions exactly as `semi_jax.train` builds
them for that platform (the guarded train step with its donated state and on-device metrics, and the eval step),
with the shardings of a `--devices`-way data axis: the state replicated, every batch split over `data`. Each
platform gets its own program, as a run there would: with `data.augment_on=auto` a GPU's step makes the views
from source images while a TPU's reads views made on the host, and with `cpu_fast_paths=auto` both get flax's
layers, since the devices are not CPUs. With `--runs=R` it also lowers the program of a `--together` sweep of R
runs on that platform, for every convolution batching of `--conv` (`together.conv`: grouped, per_run, auto): the
(run, data) mesh `together.choose_axes` picks for the platform, every traceable field traced per run, one input
stream. The check fails when
  * an operation has no lowering for a platform (lowering raises),
  * the program calls something without a cross-platform guarantee: jax.export refuses custom calls outside its
    list of stable targets (a host callback, an XLA:CPU kernel), and the module's custom-call targets are checked
    again here for CPU-only names,
  * the CPU fast paths would be on for a platform that is not a CPU,
  * an input of the train or eval batch is not sharded over the data axis, a stacked program's state is not
    sharded over the run axis, or the program is not for `--devices` devices.
It needs no accelerator and no data set (the class prior and normalisation are stand-ins; the data set's class
count comes from its registry): the devices are simulated CPU devices, only their count matters.
"""
from __future__ import annotations

import dataclasses
import re
import sys

DEFAULT_PLATFORMS = ("tpu", "cuda")
# Parts of custom-call target names that only the CPU runtime provides.
CPU_ONLY_TARGETS = ("cpu", "onednn", "lapack", "ducc", "callback", "xla_python")
# A batch argument split over the data axis: its sharding names "data" on one dimension.
_DATA_SHARDED = re.compile(r'sdy\.sharding<@mesh, \[(\{\}, )*\{"data"\}')


@dataclasses.dataclass
class Lowered:
  """One exported program and what the check found in it."""
  name: str  # "train_step" or "eval_step"
  dtype: str
  exported: object  # jax.export.Exported
  custom_calls: list[str]
  batch_inputs_sharded: int
  batch_inputs: int  # the batch arrays the program reads
  problems: list[str]
  conv: str | None = None  # a stacked program's convolution batching (together.conv), None for a run alone


def _abstract(tree, sharding):
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _arguments(module_text: str, names) -> list[str]:
  """The arguments of the module's main function whose location names one of `names` (e.g. "state")."""
  match = re.search(r"func\.func public @main\((.*?)\) ->", module_text, re.S)
  arguments = re.split(r"(?=%arg\d+:)", match.group(1)) if match else []
  return [a for a in arguments if any(f'loc("{n}' in a for n in names)]


def _batch_arguments(module_text: str) -> list[str]:
  """The arguments of the module's main function that hold a batch (a jitted function drops unused ones)."""
  return _arguments(module_text, ("batch[",))


def _custom_calls(module_text: str) -> list[str]:
  targets = re.findall(r"stablehlo\.custom_call @([\w.$-]+)", module_text)
  targets += re.findall(r'call_target_name = "([^"]+)"', module_text)
  return sorted(set(targets))


def programs_differ(config, platforms, runs: int | None = None) -> str | None:
  """Why `platforms` cannot share one exported program of `config` (each would run another one), or None."""
  from semi_jax import device_augment
  from semi_jax import program as program_lib
  views = {p: device_augment.runs_on_device(config.data.augment_on, {p}) for p in platforms}
  if len(set(views.values())) > 1:
    on = [p for p, v in views.items() if v]
    return (f"data.augment_on={config.data.augment_on!r} makes the views in the step on {on} only")
  if runs is not None:
    conv = {p: program_lib.conv_formulation(config.together.conv, {p}) for p in platforms}
    if len(set(conv.values())) > 1:
      return f"together.conv={config.together.conv!r} batches the runs' convolutions as {conv}"
  return None


def _stacked_args(config, mesh, program, runs: int):
  """The abstract arguments of a stacked program's train and eval steps: `runs` runs of one input stream, every
  traceable field traced per run (`hyperparams.traceable_fields`), as a sweep that varies them all runs it."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from semi_jax import hyperparams, run_axis, sharding
  from semi_jax import program as program_lib

  by_run = NamedSharding(mesh, P(run_axis.RUN_AXIS))
  key = jax.random.key(0).dtype
  state = _abstract(jax.eval_shape(program.init_state, jax.ShapeDtypeStruct((runs,), key)), by_run)
  carry = _abstract(jax.eval_shape(program.init_carry), by_run)
  hp = hyperparams.stack([hyperparams.of_config(config, hyperparams.traceable_fields(config))] * runs)
  inputs = {"rng": jax.ShapeDtypeStruct((runs,), key, sharding=by_run), "hp": _abstract(hp, by_run),
            "seed_index": jax.ShapeDtypeStruct((runs,), jnp.int32, sharding=by_run),
            "stream_rng": jax.ShapeDtypeStruct((1,), key, sharding=sharding.replicated(mesh))}
  batch = program_lib.batch_spec(config, mesh, program.views_on_device, streams=1)
  index = jax.ShapeDtypeStruct((runs,), jnp.int32, sharding=by_run)
  return ((state, carry, batch, inputs),
          (state.ema_params, state.batch_stats, program_lib.eval_batch_spec(config, mesh, streams=1), index))


def lower(config, mesh, platforms, runs: int | None = None) -> list[Lowered]:
  """Exports the train and eval step of `config` on `mesh` for `platforms` (which must get the same program:
  `programs_differ`); with `runs`, those of that many runs stacked on the mesh's run axis (`together`). Each
  result lists its problems."""
  import jax
  import numpy as np
  from semi_jax import datasets, run_axis, sharding
  from semi_jax import program as program_lib

  why = programs_differ(config, platforms, runs)
  if why:
    raise ValueError(f"{', '.join(platforms)} run different programs ({why}); lower them one at a time.")
  num_classes = datasets.num_classes(config.data.name)
  program = program_lib.build_program(config, mesh, num_classes=num_classes,
                                    class_prior=np.full(num_classes, 1.0 / num_classes), mean=np.full(3, 0.5),
                                    std=np.full(3, 0.25), platforms=platforms, runs=runs)
  if runs is None:
    repl = sharding.replicated(mesh)
    state = _abstract(jax.eval_shape(program.init_state, jax.random.key(0)), repl)
    carry = _abstract(jax.eval_shape(program.init_carry), repl)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    batch = program_lib.batch_spec(config, mesh, program.views_on_device)
    train_args = (state, carry, batch, rng)
    eval_args = (state.ema_params, state.batch_stats, program_lib.eval_batch_spec(config, mesh), None)
  else:
    train_args, eval_args = _stacked_args(config, mesh, program, runs)
  jobs = (("train_step", program.train_step, train_args), ("eval_step", program.eval_step, eval_args))
  results = []
  for name, fn, args in jobs:
    exported = jax.export.export(fn, platforms=tuple(platforms))(*args)
    text = exported.mlir_module()
    calls = _custom_calls(text)
    batch_args = _batch_arguments(text)
    batch_inputs = len(batch_args)
    sharded = sum(bool(_DATA_SHARDED.search(a)) for a in batch_args)
    problems = [f"custom call {t!r} is CPU-only" for t in calls if any(p in t.lower() for p in CPU_ONLY_TARGETS)]
    if program.cpu_fast_paths and not set(platforms) <= {"cpu"}:
      problems.append(f"the CPU fast paths are on (cpu_fast_paths={config.cpu_fast_paths!r}) for {platforms}")
    if not batch_inputs or sharded < batch_inputs:
      problems.append(f"{sharded} of the {batch_inputs} batch inputs are sharded over the data axis")
    if runs is not None:
      state_args = _arguments(text, ("state", "params", "batch_stats"))
      by_run = sum(f'{{"{run_axis.RUN_AXIS}"}}' in a for a in state_args)
      if not state_args or by_run < len(state_args):
        problems.append(f"{by_run} of the {len(state_args)} state inputs are sharded over the run axis")
    if exported.nr_devices != mesh.devices.size:
      problems.append(f"lowered for {exported.nr_devices} devices, not {mesh.devices.size}")
    results.append(Lowered(name, config.model.dtype, exported, calls, sharded, batch_inputs, problems,
                           program.conv))
  return results


def stacked_mesh(config, devices: list, runs: int, platform: str):
  """The (run, data) mesh a sweep of `runs` runs of `config` gets on `devices` of `platform` (`choose_axes`)."""
  from semi_jax import program, together
  r, d = together.axes_for(config, len(devices), runs, platform=program.platform_family({platform}))
  return together.make_mesh(r, d, devices)


def check(config, platforms=DEFAULT_PLATFORMS, devices: int = 8, dtypes=("float32", "bfloat16"), runs: int = 0,
          convs=("auto",), log=print) -> bool:
  """Lowers `config` for every dtype and platform, a run alone and, with `runs`, that many runs stacked in every
  convolution batching of `convs` (`together.conv`); prints one line per program; True when nothing was found."""
  import jax
  from semi_jax import config_validation, sharding, together

  if jax.device_count() < devices:
    raise ValueError(f"{jax.device_count()} devices are available, {devices} asked for; run this command in a "
                     "fresh process (it simulates the devices on the CPU before JAX starts).")
  pool = jax.devices()[:devices]
  mesh = sharding.make_mesh(devices=pool)
  ok = True
  for dtype in dtypes:
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    config_validation.validate(config, num_devices=devices, num_processes=1)
    for platform in platforms:
      jobs = [(None, mesh, "alone")]
      if runs:  # one mesh for every convolution batching: the split depends on the batches, not on the batching
        stacked = stacked_mesh(config, pool, runs, platform)
        what = f"{runs} runs on run {stacked.shape[together.RUN_AXIS]} x data {stacked.shape[sharding.DATA_AXIS]}"
        jobs += [(conv, stacked, what) for conv in convs]
      for conv, job_mesh, what in jobs:
        if conv is not None:
          config.together.conv = conv
        results = lower(config, job_mesh, (platform,), None if conv is None else together.padded_runs(runs, job_mesh))
        for result in results:
          ok &= not result.problems
          status = "ok" if not result.problems else "FAILED: " + "; ".join(result.problems)
          kind = what if result.conv is None else f"{what}, conv {result.conv}"
          log(f"{result.name:<11} {dtype:<9} {platform:<5} {devices} devices, {kind}: "
              f"{len(result.exported.mlir_module()) / 1e6:5.2f} MB StableHLO, batch inputs sharded "
              f"{result.batch_inputs_sharded}/{result.batch_inputs}, custom calls {result.custom_calls or 'none'}: "
              f"{status}")
  return ok


def dtypes_to_lower(flag_values) -> tuple:
  """`--dtypes`; without it, the dtype of a `--config.model.dtype=` override, else float32 and bfloat16."""
  from ml_collections import config_flags
  if flag_values.dtypes:
    return tuple(flag_values.dtypes)
  overrides = config_flags.get_override_values(flag_values["config"])
  return (overrides["model.dtype"],) if "model.dtype" in overrides else ("float32", "bfloat16")


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]) of the planned run.",
                                  lock_config=True)
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Platforms to lower for: tpu, cuda, rocm.")
  flags.DEFINE_integer("devices", 8, "Devices on the data axis.", lower_bound=1)
  flags.DEFINE_list("dtypes", [], "Model compute dtypes to lower (default: the --config.model.dtype override's, "
                    "else float32 and bfloat16).")
  flags.DEFINE_integer("runs", 0, "Also lower the program of this many runs trained together (--together); 0: "
                       "a run alone only.", lower_bound=0)
  flags.DEFINE_list("conv", ["auto"], "The stacked program's convolution batchings (together.conv) to lower with "
                    "--runs: grouped, per_run, auto.")
  flags.mark_flags_as_required(["config"])
  return flags.FLAGS


def main(argv, flag_values) -> int:
  if len(argv) > 1:
    sys.exit(f"semi_jax.tools.export_check: unexpected arguments {argv[1:]}")
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", flag_values.devices)  # before the CPU backend starts
  try:
    ok = check(flag_values.config, platforms=tuple(flag_values.platforms), devices=flag_values.devices,
               dtypes=dtypes_to_lower(flag_values), runs=flag_values.runs, convs=tuple(flag_values.conv))
  except ValueError as e:
    sys.exit(f"semi_jax.tools.export_check: {e}")
  print("all programs lowered" if ok else "some programs failed the check (see above)")
  return 0 if ok else 1


if __name__ == "__main__":
  from absl import app
  from semi_jax import config_files
  FLAGS = _define_flags()
  app.run(lambda argv: main(argv, FLAGS),
          flags_parser=lambda argv: config_files.parse_flags(FLAGS, argv, "semi_jax.tools.export_check"))
