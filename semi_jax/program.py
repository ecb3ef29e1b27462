"""What a run executes, built for a mesh: state init, the guarded train step, evaluation; for a run alone or for R
runs stacked on a leading run axis (semi_jax.together).

`build_program` returns a `Program` of jitted functions (not yet compiled). A run alone's state is replicated
over the mesh's `data` axis; stacked runs' state is sharded over its `run` axis. Both programs share every piece
of the step (`semi_jax.train_step`); the stacked one vmaps them over the runs and takes the gradient of the summed
loss. How a stacked program batches its convolutions over the runs (`together.conv`) is a per-platform choice
made by measurement (`AUTO_CONV`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from semi_jax import config_validation, cpu, device_augment, hyperparams, memory_bank, metrics, run_axis
from semi_jax import semi_state, sharding
from semi_jax import train_step as steps
from semi_jax.cpu import compiler_options
from semi_jax.models import PerRun, create_model
from semi_jax.state import create_train_state, make_optimizer

CONV_FORMULATIONS = ("grouped", "per_run", "auto")  # together.conv
OVERLAP_SETTINGS = ("on", "off", "auto")  # together.overlap
# together.conv=auto, per platform: the formulation of the stacked step that measured fastest there
# (`semi_jax.tools.accelerator_report`, docs/performance.md). CPU: per_run stepped fastest at 1, 3, 9 and 27
# stacked digits_lt runs (6.41 run-steps/s at 9 runs, grouped 5.87). A platform not measured (GPU, TPU) keeps the
# batch-grouped program (the gradient of the summed loss, JAX's own batching).
AUTO_CONV = {"cpu": "per_run"}
# together.overlap=auto, per platform (GPUs only): whether independent runs' kernels may run concurrently.
AUTO_OVERLAP = {}
# The XLA:GPU option that lets independent kernels of a command buffer run concurrently.
GPU_OVERLAP_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}


def platform_family(platforms) -> str:
  """The platform family of a set of device platforms ('cpu', 'gpu', 'cuda', 'tpu', ...): tpu, gpu or cpu."""
  names = {"gpu" if p in device_augment.GPU_PLATFORMS else p for p in platforms}
  return next((family for family in ("tpu", "gpu") if family in names), "cpu")


def conv_formulation(setting: str, platforms) -> str:
  """The stacked step's convolution batching for `together.conv`=`setting` on `platforms`."""
  if setting not in CONV_FORMULATIONS:
    raise config_validation.ConfigError(f"config field together.conv={setting!r} is invalid: choose one of "
                                        f"{CONV_FORMULATIONS}.")
  return AUTO_CONV.get(platform_family(platforms), "grouped") if setting == "auto" else setting


def overlap_options(setting: str, platforms) -> dict:
  """The compiler options of `together.overlap`=`setting` on `platforms` (GPUs only; none elsewhere)."""
  if setting not in OVERLAP_SETTINGS:
    raise config_validation.ConfigError(f"config field together.overlap={setting!r} is invalid: choose one of "
                                        f"{OVERLAP_SETTINGS}.")
  platform = platform_family(platforms)
  on = AUTO_OVERLAP.get(platform, False) if setting == "auto" else setting == "on"
  return dict(GPU_OVERLAP_OPTIONS) if on and platform == "gpu" else {}


def _sharded_spec(mesh, streams: int | None):
  """(shape, dtype) -> an abstract batch array split over `data`; with `streams`, a stacked program's batch of one
  array per input stream on a leading (unsplit) stream axis."""
  if streams is None:
    return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharded(mesh))
  stacked = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
  return lambda shape, dtype: jax.ShapeDtypeStruct((streams,) + shape, dtype, sharding=stacked)


def batch_spec(config, mesh, views_on_device: bool = False, streams: int | None = None) -> dict:
  """The abstract global train batch of `config` on `mesh`, with its sharding (see `train_step`); with
  `views_on_device` (`Program.views_on_device`), the source batch the step makes the views from; with `streams`,
  that of a stacked program (`train_step.stacked_step`)."""
  t, s = config.train, config.data.image_size
  b, u = t.batch_size, t.batch_size * t.mu
  spec = _sharded_spec(mesh, streams)
  labels = {"y": spec((b,), jnp.int32), "u_label": spec((u,), jnp.int32), "u_index": spec((u,), jnp.int32)}
  if views_on_device:
    return {"images": spec((b + u, s, s, 3), jnp.uint8), "positions": spec((b + u,), jnp.int32), **labels}
  return {"images": spec((b + 3 * u, s, s, 3), jnp.uint8), **labels}


def eval_batch_spec(config, mesh, streams: int | None = None) -> dict:
  """The abstract global eval batch of `config` on `mesh`, with its sharding (with `streams`: see `batch_spec`)."""
  n, s = config.train.eval_batch_size, config.data.image_size
  spec = _sharded_spec(mesh, streams)
  return {"image": spec((n, s, s, 3), jnp.uint8), "label": spec((n,), jnp.int32), "mask": spec((n,), jnp.bool_)}


@dataclasses.dataclass(frozen=True)
class Program:
  """The jitted functions of a run, or of `runs` stacked runs, on one mesh, and what they were built with.

  A run alone (`runs` None): init_state(key) -> state; train_step(state, carry, batch, key) -> (state, carry);
  eval_step(params, batch_stats, batch, index) -> sums (index unused).
  Stacked runs: init_state(keys[R]) -> state[R]; train_step(state, carry, batch[S], inputs) -> (state, carry)
  with the per-run inputs of `together.stack_inputs` (`train_step.stacked_step`); eval_step(params[R],
  batch_stats[R], batch[S], index[R]) -> sums[R], run r evaluated on batch index[r].
  Both: init_carry() -> carry; reset_metrics(carry) -> carry with the metric sums zeroed;
  reset_pseudo_counts(state) -> state with the per-class pseudo-label counts zeroed; bank_stats(state) -> the
  per-class fill and mean confidence of the memory bank ([C], or [R, C]), computed on the device. train_step
  donates state and carry. All are compiled with `compiler_options`.
  """
  ctx: steps.StepContext
  runs: int | None
  cpu_fast_paths: bool
  compiler_options: dict
  conv: str | None  # the stacked step's convolution batching (None for a run alone)
  metrics_cls: Any
  loss_keys: tuple[str, ...]
  init_state: Callable
  init_carry: Callable
  train_step: Callable
  reset_metrics: Callable
  reset_pseudo_counts: Callable
  eval_step: Callable
  bank_stats: Callable

  @property
  def views_on_device(self) -> bool:
    """Whether the train step makes the views (data.augment_on) and so reads source batches."""
    return self.ctx.augment is not None

  @property
  def stacked(self) -> bool:
    return self.runs is not None


def augment_settings(config, mesh, platforms=None):
  """The `device_augment.Settings` of a run whose train step makes the views (data.augment_on, resolved for
  `platforms`, default: those of the mesh's devices), else None."""
  if not device_augment.runs_on_device(config.data.augment_on, cpu.platforms_of(mesh) if platforms is None
                                       else platforms):
    return None
  config_validation.check_device_augment(config)
  return device_augment.Settings.from_config(config.data)


def cpu_fast_paths(config, mesh, platforms=None) -> tuple[bool, dict]:
  """(whether the CPU fast paths are on, the XLA compiler options) of a run of `config` on `mesh`, meant for
  `platforms` (default: those of the mesh's devices). The compiler options apply only where the mesh's devices
  are CPUs."""
  mesh_platforms = cpu.platforms_of(mesh)
  fast = cpu.enabled(config.cpu_fast_paths, mesh_platforms if platforms is None else platforms)
  return fast, compiler_options.for_run(fast and mesh_platforms == {"cpu"})


def step_context(config, mesh, *, num_classes: int, class_prior, mean, std, platforms=None, model=None,
                 per_run: PerRun | None = None):
  """(the step's static inputs, whether the CPU fast paths are on, the compiler options) of a run of `config`
  on `mesh`, meant for `platforms` (see `build_program`)."""
  fast, options = cpu_fast_paths(config, mesh, platforms)
  model = model or create_model(config.model, num_classes, cpu_fast_paths=fast, per_run=per_run)
  hp = hyperparams.of_config(config)
  ctx = steps.StepContext(model=model, tx=make_optimizer(config, hp), config=config,
                          class_prior=np.asarray(class_prior, np.float32), mean=np.asarray(mean, np.float32),
                          std=np.asarray(std, np.float32), mesh=mesh,
                          augment=augment_settings(config, mesh, platforms), hp=hp)
  return ctx, fast, options


def build_program(config, mesh, *, num_classes: int, class_prior, mean, std, runs: int | None = None,
                  platforms=None, model=None) -> Program:
  """Builds (without compiling) the jitted functions of a run of `config` on `mesh`, or with `runs`, of that many
  runs stacked on the mesh's `run` axis (`config` is then any member's: the fields in which the members differ
  are read from the step's per-run `hp` input instead).

  `platforms` are the platforms the program is meant for (default: those of the mesh's devices). The CPU fast
  paths (`cpu_fast_paths`) follow them, so that a program lowered for TPU or GPU on a CPU machine gets the
  accelerator layers. `model` replaces the configured one (benchmarks of the loop itself).
  """
  targets = cpu.platforms_of(mesh) if platforms is None else set(platforms)
  conv = None if runs is None else conv_formulation(config.together.conv, targets)
  per_run = PerRun(mesh if run_axis.RUN_AXIS in mesh.axis_names else None) if conv == "per_run" else None
  ctx, fast, options = step_context(config, mesh, num_classes=num_classes, class_prior=class_prior, mean=mean,
                                    std=std, platforms=platforms, model=model, per_run=per_run)
  if runs is not None:
    options = {**options, **overlap_options(config.together.overlap, targets)}
  model = ctx.model
  jit = functools.partial(jax.jit, compiler_options=options or None)
  # The metric names are those the step returns, known once it is traced.
  init_one = functools.partial(create_train_state, model, ctx.tx, image_size=config.data.image_size,
                               num_classes=num_classes, bank_size=config.bank.size, bank_dtype=config.bank.dtype,
                               guard_window=config.train.nonfinite_window)
  one_state = jax.eval_shape(init_one, jax.random.key(0))
  batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                       batch_spec(config, mesh, ctx.augment is not None))
  out_shape = jax.eval_shape(functools.partial(steps.train_step, ctx=ctx), one_state, batch, jax.random.key(0))[1]
  metrics_cls = metrics.train_metrics_collection(out_shape)
  loss_keys = tuple(k for k in sorted(out_shape) if k.startswith("loss"))
  init_one = functools.partial(init_one, loss_keys=loss_keys)
  empty_counts = semi_state.empty_pseudo_counts(num_classes)

  def bank_stats_one(bank):
    return {"fill": memory_bank.fill_fraction(bank), "confidence": memory_bank.mean_confidence(bank)}

  if runs is None:
    repl = sharding.replicated(mesh)
    step = functools.partial(steps.guarded_step, ctx=ctx, metrics_cls=metrics_cls)
    return Program(
        ctx=ctx, runs=None, cpu_fast_paths=fast, compiler_options=options, conv=None, metrics_cls=metrics_cls,
        loss_keys=loss_keys, init_state=jit(init_one, out_shardings=repl),
        init_carry=jit(functools.partial(steps.init_carry, metrics_cls), out_shardings=repl),
        train_step=jit(step, donate_argnums=(0, 1), out_shardings=(repl, repl)),
        reset_metrics=jit(lambda carry: {**carry, "metrics": metrics_cls.empty()}, donate_argnums=0,
                          out_shardings=repl),
        reset_pseudo_counts=jit(lambda state: state.replace(semi=state.semi.replace(pseudo_counts=empty_counts)),
                                donate_argnums=0, out_shardings=repl),
        eval_step=jit(lambda params, batch_stats, batch, index=None: steps.eval_step(params, batch_stats, batch, ctx),
                      out_shardings=repl),
        bank_stats=jit(lambda state: bank_stats_one(state.semi.bank), out_shardings=repl))

  by_run = NamedSharding(mesh, P(run_axis.RUN_AXIS))
  vmap = functools.partial(jax.vmap, spmd_axis_name=run_axis.RUN_AXIS)
  stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (runs,) + jnp.shape(x)), tree)
  step = functools.partial(steps.stacked_step, ctx=ctx, metrics_cls=metrics_cls, isolate=conv == "grouped")

  def eval_fn(params, batch_stats, batch, index):
    one = lambda p, b, i: steps.eval_step(p, b, jax.tree.map(lambda x: x[i], batch), ctx)
    return vmap(one)(params, batch_stats, index)

  logging.info("Stacked program of %d runs: convolutions %s, compiler options %s", runs, conv, options or "none")
  return Program(
      ctx=ctx, runs=runs, cpu_fast_paths=fast, compiler_options=options, conv=conv, metrics_cls=metrics_cls,
      loss_keys=loss_keys, init_state=jit(vmap(init_one), out_shardings=by_run),
      init_carry=jit(lambda: stack(steps.init_carry(metrics_cls)), out_shardings=by_run),
      train_step=jit(step, donate_argnums=(0, 1), out_shardings=(by_run, by_run)),
      reset_metrics=jit(lambda carry: {**carry, "metrics": stack(metrics_cls.empty())}, donate_argnums=0,
                        out_shardings=by_run),
      reset_pseudo_counts=jit(lambda state: state.replace(semi=state.semi.replace(pseudo_counts=stack(empty_counts))),
                              donate_argnums=0, out_shardings=by_run),
      eval_step=jit(eval_fn, out_shardings=by_run),
      bank_stats=jit(lambda state: vmap(bank_stats_one)(state.semi.bank), out_shardings=by_run))
