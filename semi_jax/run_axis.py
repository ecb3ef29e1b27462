"""The run axis of stacked programs (runs trained together, semi_jax.together): how an operation is batched over it.

A stacked program gives every array of the train state a leading run axis and `jax.vmap`s the step over it. By
default vmap batches each operation as JAX's batching rules do: a convolution whose kernel differs per run becomes
one grouped convolution with a group per run (`feature_group_count` = runs, and `batch_group_count` = runs for the
kernel gradient of the summed loss). Some accelerators run those grouped forms far slower than the same runs'
convolutions one by one. `per_run(fn, mesh)` makes `fn` batch one run at a time instead: under vmap, each run's
call is the very call a run alone makes (same kernels, forward, data gradient and kernel gradient), in a loop
over the runs that XLA may schedule concurrently. Which form a layer uses is chosen per platform by measurement
(`together.conv`); the models ask for it through their layers (`semi_jax.models.layers`).

Where the run axis spans several devices the loop runs inside `jax.shard_map` over that mesh axis alone: each
device loops over its own runs, and the data axis stays under XLA's automatic partitioning (so the kernel
gradient of a data-parallel batch is still all-reduced over `data`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

RUN_AXIS = "run"


def _spans_devices(mesh) -> bool:
  return mesh is not None and RUN_AXIS in mesh.axis_names and mesh.shape[RUN_AXIS] > 1


def _loop_over_runs(fn: Callable, mesh) -> Callable:
  """`fn` applied to every run of arrays with a leading run axis, one run at a time (unrolled); on this device's
  runs only where the run axis spans devices."""

  def loop(*args):
    outs = [fn(*(a[r] for a in args)) for r in range(args[0].shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  if not _spans_devices(mesh):
    return loop
  return jax.shard_map(loop, mesh=mesh, in_specs=P(RUN_AXIS), out_specs=P(RUN_AXIS), axis_names={RUN_AXIS},
                       check_vma=False)


def _batched_one_by_one(fn: Callable, mesh) -> Callable:
  """`fn` (of arrays, returning an array or a tuple of arrays), whose vmap runs `fn` once per run."""
  batched = jax.custom_batching.custom_vmap(fn)

  @batched.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = [a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a)) for a, b in zip(args, in_batched)]
    out = _loop_over_runs(fn, mesh)(*args)
    return out, jax.tree.map(lambda _: True, out)

  return batched


def per_run(fn: Callable, mesh=None) -> Callable:
  """`fn(x, w)` (e.g. a convolution of activations x with a kernel w), differentiable, whose vmap over runs calls
  `fn` and its VJP run by run instead of batching them (see the module docstring). Unbatched, it is `fn`.

  `mesh` is the program's (run, data) mesh, or None for a single device."""
  forward = _batched_one_by_one(fn, mesh)

  def _vjp(x, w, g):
    return jax.vjp(fn, x, w)[1](g)

  backward = _batched_one_by_one(_vjp, mesh)

  @jax.custom_vjp
  def call(x, w):
    return forward(x, w)

  def call_fwd(x, w):
    return forward(x, w), (x, w)

  def call_bwd(residuals, g):
    x, w = residuals
    return tuple(backward(x, w, g))

  call.defvjp(call_fwd, call_bwd)
  return call


def map_runs(fn: Callable, mesh, run_args: tuple, shared_args: tuple = ()):
  """`fn(*run_slices, *shared_args)` for every run, stacked: `run_args` have a leading run axis, `shared_args`
  are the same for every run. A sequential map (one compiled body, whatever the number of runs), on each device's
  own runs where the run axis spans devices."""
  def local(*args):
    runs, shared = args[:len(run_args)], args[len(run_args):]
    return jax.lax.map(lambda xs: fn(*xs, *shared), runs)

  if not _spans_devices(mesh):
    return local(*run_args, *shared_args)
  specs = (P(RUN_AXIS),) * len(run_args) + (P(),) * len(shared_args)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(RUN_AXIS), axis_names={RUN_AXIS},
                       check_vma=False)(*run_args, *shared_args)
