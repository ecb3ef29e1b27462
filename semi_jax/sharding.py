"""The device mesh and how arrays are laid out on it.

A 1-D data-parallel mesh: batches are split over the `data` axis, everything else (parameters, optimiser
state, memory bank) is replicated. `jax.jit` inserts the collectives (pjit style); no pmap.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """A mesh over `devices` (default: all devices of all processes) with one `data` axis."""
  devices = list(jax.devices() if devices is None else devices)
  size = -1 if mesh_config is None else int(mesh_config.data_axis_size)
  if size == -1:
    size = len(devices)
  if size < 1 or size > len(devices):
    raise ValueError(f"mesh.data_axis_size={size} but {len(devices)} devices are available; use -1 for all.")
  return Mesh(np.asarray(devices[:size]), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def explicit_replicated(x: jax.Array):
  """The replicated sharding of `x`'s mesh when `x`'s type is sharded over an Explicit mesh axis, else None.

  Under Explicit axes, sorting along a sharded axis or contracting one in a product needs the result's
  sharding spelled out; under Auto axes (the type says nothing) XLA decides.
  """
  sharding = jax.typeof(x).sharding
  return sharding.update(spec=P()) if any(axis is not None for axis in sharding.spec) else None


def unshard_if_explicit(x: jax.Array) -> jax.Array:
  """Replicates `x` when it is sharded over an Explicit mesh axis (a no-op for Auto axes)."""
  target = explicit_replicated(x)
  return x if target is None else jax.sharding.reshard(x, target)


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Turns this process's slice of a batch (numpy arrays) into global arrays sharded over `data`."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
