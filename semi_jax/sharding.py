"""The device mesh and how arrays are laid out on it.

A 1-D data-parallel mesh: batches are split over the `data` axis, everything else (parameters, optimiser
state, memory bank) is replicated. `jax.jit` inserts the collectives (pjit style); no pmap. Its devices keep their
order: an all-reduce over every device does not depend on it. Meshes whose data axis is a subgroup of the devices
(runs trained together, semi_jax.together) are laid out by the interconnect (`device_grid`).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """A mesh over `devices` (default: all devices of all processes) with one `data` axis of
  `mesh_config.data_axis_size` devices (-1: all; see `mesh_devices`)."""
  devices = list(jax.devices() if devices is None else devices)
  size = -1 if mesh_config is None else int(mesh_config.data_axis_size)
  return Mesh(np.asarray(mesh_devices(devices, size)), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def mesh_devices(devices: list, size: int) -> list:
  """The `size` devices (-1: all) of a data axis over `devices`, in their order.

  A size below the device count takes a sub-mesh. With several processes every process keeps the same number
  of its own devices (its first ones), so that each feeds only devices it owns; a size that cannot be split
  so is refused with the valid sizes.
  """
  size = len(devices) if size == -1 else size
  if size < 1 or size > len(devices):
    raise ValueError(f"mesh.data_axis_size={size} but {len(devices)} devices are available; use -1 for all.")
  by_process = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  if size == len(devices) or len(by_process) == 1:
    return devices[:size]
  per_process, rest = divmod(size, len(by_process))
  fewest = min(len(ds) for ds in by_process.values())
  if rest or per_process > fewest:
    valid = [len(by_process) * k for k in range(1, fewest + 1)]
    raise ValueError(
        f"mesh.data_axis_size={size} cannot be split evenly over the {len(by_process)} processes ({fewest} "
        f"devices each): every process must own the same number of the mesh's devices. Use -1 (all devices) or "
        f"one of {valid}.")
  keep = {id(d) for ds in by_process.values() for d in ds[:per_process]}
  return [d for d in devices if id(d) in keep]


def data_positions(grid: np.ndarray) -> dict[int, list[int]]:
  """{process index: the positions on the data axis (the grid's last) that its devices hold}."""
  positions = {}
  for index, device in np.ndenumerate(grid):
    positions.setdefault(device.process_index, set()).add(index[-1])
  return {p: sorted(held) for p, held in positions.items()}


def aligned(held: list[int], size: int) -> bool:
  """Whether data-axis positions `held` (sorted) are one aligned range of an equal split of `size` positions: a
  process holding them feeds one whole slice of every batch."""
  return (bool(held) and held == list(range(held[0], held[0] + len(held))) and size % len(held) == 0
          and held[0] % len(held) == 0)


def _over_slices(shape: tuple[int, ...], slices: int) -> tuple[int, ...]:
  """How many slices each mesh axis spans, the leading (least communicating) axes taking them first (for equal
  slices, whose count divides the devices, the axes always take them all)."""
  spans, rest = [], slices
  for size in shape:
    spans.append(math.gcd(size, rest))
    rest //= spans[-1]
  return tuple(spans)


def device_grid(devices: list, shape: tuple[int, ...]) -> np.ndarray:
  """`devices` laid out as a mesh of `shape`, whose axes are ordered by increasing communication (the data axis,
  with its all-reduces of gradients and BatchNorm statistics, last).

  On TPUs and GPUs, jax's topology-aware layout (`mesh_utils`): a data-axis group gets neighbouring chips on the
  interconnect, and across several slices (TPU multi-slice, NVLink domains: `slice_index`) the leading axes span
  the slices' slower network (DCN) first, so that a data axis that fits in a slice never crosses it. The devices'
  own order (rows of consecutive devices) is kept on CPUs, where the library cannot lay the devices out (a part of
  a slice), and where its layout would leave some process without one aligned, equal range of data-axis positions
  (each process feeds whole slices of every batch: `together.data_slice`).
  """
  from jax.experimental import mesh_utils
  devices = list(devices)
  plain = np.asarray(devices, dtype=object).reshape(shape)
  if devices[0].platform == "cpu":
    return plain
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  try:
    if slices > 1:
      spans = _over_slices(shape, slices)
      grid = mesh_utils.create_hybrid_device_mesh([n // k for n, k in zip(shape, spans)], spans, devices)
    else:
      grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.info("A %s mesh keeps the devices' order: no topology-aware layout (%s).", shape, e)
    return plain
  grid = np.asarray(grid, dtype=object).reshape(shape)
  held = data_positions(grid)
  if len({len(h) for h in held.values()}) > 1 or not all(aligned(h, shape[-1]) for h in held.values()):
    logging.info("A %s mesh keeps the devices' order: the topology-aware layout splits a process's data-axis "
                 "positions (%s).", shape, held)
    return plain
  return grid


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


def from_host_values(tree, sharding: NamedSharding):
  """Host values that every process holds in full as global arrays laid out by `sharding` (which may span
  devices of other processes, where device_put cannot go)."""
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
                      tree)
