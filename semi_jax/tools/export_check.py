"""Lowers a config's train and eval steps for TPU and GPU on this machine: the check to run before booking a pod.

  python -m semi_jax.tools.export_check --config=configs/cifar10_lt.py[:args] [--config.a.b=v ...]
      [--platforms=tpu,cuda] [--devices=8] [--dtypes=float32,bfloat16]

Give it the config and overrides of the run you plan (as to semi_jax.main). It lowers the dtypes of `--dtypes`;
without it, the one of a `--config.model.dtype=` override, or else float32 and bfloat16.

For every dtype, `jax.export` lowers the run's jitted functions exactly as `semi_jax.train` builds them (the
guarded train step with its donated state and on-device metrics, and the eval step) for all the platforms at
once, with the shardings of a `--devices`-way data axis: the state replicated, every batch split over `data`. The
model is the one the run gets on those platforms: with `cpu_fast_paths=auto`, flax's layers, since the devices
are not CPUs. The check fails when
  * an operation has no lowering for a platform (lowering raises),
  * the program calls something without a cross-platform guarantee: jax.export refuses custom calls outside its
    list of stable targets (a host callback, an XLA:CPU kernel), and the module's custom-call targets are checked
    again here for CPU-only names,
  * the CPU fast paths would be on for a platform that is not a CPU,
  * an input of the train or eval batch is not sharded over the data axis, or the program is not for
    `--devices` devices.
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


def _abstract(tree, sharding):
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _batch_arguments(module_text: str) -> list[str]:
  """The arguments of the module's main function that hold a batch (a jitted function drops unused ones)."""
  match = re.search(r"func\.func public @main\((.*?)\) ->", module_text, re.S)
  arguments = re.split(r"(?=%arg\d+:)", match.group(1)) if match else []
  return [a for a in arguments if 'loc("batch[' in a]


def _custom_calls(module_text: str) -> list[str]:
  targets = re.findall(r"stablehlo\.custom_call @([\w.$-]+)", module_text)
  targets += re.findall(r'call_target_name = "([^"]+)"', module_text)
  return sorted(set(targets))


def lower(config, mesh, platforms=DEFAULT_PLATFORMS) -> list[Lowered]:
  """Exports the train and eval step of `config` on `mesh` for `platforms`; each result lists its problems."""
  import jax
  import numpy as np
  from semi_jax import datasets, sharding
  from semi_jax import program as program_lib

  num_classes = datasets.num_classes(config.data.name)
  program = program_lib.build_program(config, mesh, num_classes=num_classes,
                                    class_prior=np.full(num_classes, 1.0 / num_classes), mean=np.full(3, 0.5),
                                    std=np.full(3, 0.25), platforms=platforms)
  repl = sharding.replicated(mesh)
  state = _abstract(jax.eval_shape(program.init_state, jax.random.key(0)), repl)
  carry = _abstract(jax.eval_shape(program.init_carry), repl)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  batch = program_lib.batch_spec(config, mesh, program.views_on_device)
  jobs = (("train_step", program.train_step, (state, carry, batch, rng)),
          ("eval_step", program.eval_step, (state.ema_params, state.batch_stats,
                                                 program_lib.eval_batch_spec(config, mesh), None)))
  results = []
  for name, fn, args in jobs:
    exported = jax.export.export(fn, platforms=tuple(platforms))(*args)
    text = exported.mlir_module()
    calls = _custom_calls(text)
    batch_args = _batch_arguments(text)
    batch_inputs = len(batch_args)
    sharded = sum('sdy.sharding<@mesh, [{"data"}' in a for a in batch_args)
    problems = [f"custom call {t!r} is CPU-only" for t in calls if any(p in t.lower() for p in CPU_ONLY_TARGETS)]
    if program.cpu_fast_paths and not set(platforms) <= {"cpu"}:
      problems.append(f"the CPU fast paths are on (cpu_fast_paths={config.cpu_fast_paths!r}) for {platforms}")
    if not batch_inputs or sharded < batch_inputs:
      problems.append(f"{sharded} of the {batch_inputs} batch inputs are sharded over the data axis")
    if exported.nr_devices != mesh.devices.size:
      problems.append(f"lowered for {exported.nr_devices} devices, not {mesh.devices.size}")
    results.append(Lowered(name, config.model.dtype, exported, calls, sharded, batch_inputs, problems))
  return results


def check(config, platforms=DEFAULT_PLATFORMS, devices: int = 8, dtypes=("float32", "bfloat16"),
          log=print) -> bool:
  """Lowers `config` for every dtype; prints one line per program; True when nothing was found."""
  import jax
  from semi_jax import config_validation, sharding

  if jax.device_count() < devices:
    raise ValueError(f"{jax.device_count()} devices are available, {devices} asked for; run this command in a "
                     "fresh process (it simulates the devices on the CPU before JAX starts).")
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  ok = True
  for dtype in dtypes:
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    config_validation.validate(config, num_devices=devices, num_processes=1)
    for result in lower(config, mesh, platforms):
      ok &= not result.problems
      status = "ok" if not result.problems else "FAILED: " + "; ".join(result.problems)
      log(f"{result.name:<11} {dtype:<9} {','.join(platforms):<9} {devices} devices  "
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
               dtypes=dtypes_to_lower(flag_values))
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
