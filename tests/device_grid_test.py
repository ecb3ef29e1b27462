"""How the devices of a (run, data) mesh are laid out (`sharding.device_grid`), on simulated TPU v4 topologies.

The devices here are stand-ins with the attributes jax's topology-aware layout reads (chip coordinates, process,
slice); no program runs on them. A run's data axis carries its all-reduces (gradients, BatchNorm statistics), the
run axis none, so a data row must stay within a slice and on neighbouring chips, while the run axis crosses the
slower network between slices.
"""
import dataclasses
import itertools
import random

import jax
import numpy as np
import pytest

from semi_jax import sharding, together


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  id: int
  coords: tuple
  process_index: int
  slice_index: int = 0
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"


def v4_slice(dims, slice_index=0, first_id=0, first_process=0):
  """The chips of a TPU v4 slice of `dims` (x, y, z), one host per x-y layer, in id order."""
  chips = itertools.product(range(dims[2]), range(dims[1]), range(dims[0]))
  return [FakeTpu(first_id + i, (x, y, z), first_process + z, slice_index) for i, (z, y, x) in enumerate(chips)]


def _plain(devices, shape):
  return np.asarray(devices, dtype=object).reshape(shape)


def _neighbours(a, b):
  return sum(abs(p - q) for p, q in zip(a.coords, b.coords)) == 1


@pytest.fixture
def two_slices():
  """Two 2x2x1 slices (one host each), listed alternately: the order alone would pair chips of both slices."""
  first, second = v4_slice((2, 2, 1), 0, 0, 0), v4_slice((2, 2, 1), 1, 100, 1)
  return [d for pair in zip(first, second) for d in pair]


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (8, 1)])
def test_the_run_axis_crosses_slices_and_a_data_row_stays_in_one(two_slices, shape):
  grid = sharding.device_grid(two_slices, shape)
  assert sorted(d.id for d in grid.flat) == sorted(d.id for d in two_slices)
  for row in grid:
    assert len({d.slice_index for d in row}) == 1, row
  slices = [row[0].slice_index for row in grid]
  assert slices == sorted(slices) and set(slices) == {0, 1}
  # the devices' own order puts both slices in every row of 2 or more
  if shape[1] > 1:
    assert all(len({d.slice_index for d in row}) == 2 for row in _plain(two_slices, shape))


def test_a_data_axis_wider_than_a_slice_spans_the_slices_in_halves(two_slices):
  (row,) = sharding.device_grid(two_slices, (1, 8))
  assert [d.slice_index for d in row] == [0] * 4 + [1] * 4


def test_a_data_row_gets_neighbouring_chips():
  """One 2x2x2 slice of two hosts, listed in a shuffled order."""
  devices = v4_slice((2, 2, 2))
  random.Random(0).shuffle(devices)
  rows = sharding.device_grid(devices, (2, 4))
  for row in rows:  # each row is one host's 2x2 layer
    assert len({d.process_index for d in row}) == 1 and len({d.coords[2] for d in row}) == 1
  for row in sharding.device_grid(devices, (4, 2)):  # each row two neighbouring chips of one host
    assert _neighbours(*row) and row[0].process_index == row[1].process_index
  assert not all(_neighbours(*row) for row in _plain(devices, (4, 2)))  # what the order alone gives


def test_a_layout_that_splits_a_process_keeps_the_devices_order(monkeypatch):
  """Each process feeds one aligned range of the data axis (together.data_slice): a layout that interleaves two
  processes' chips on it is not used."""
  devices = v4_slice((2, 2, 2))
  from jax.experimental import mesh_utils
  interleaved = [d for pair in zip(devices[:4], devices[4:]) for d in pair]
  monkeypatch.setattr(mesh_utils, "create_device_mesh", lambda shape, devs, **_: _plain(interleaved, shape))
  assert np.array_equal(sharding.device_grid(devices, (1, 8)), _plain(devices, (1, 8)))
  assert sharding.data_positions(_plain(interleaved, (1, 8))) == {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}
  assert not sharding.aligned([0, 2, 4, 6], 8) and sharding.aligned([4, 5, 6, 7], 8)


def test_what_the_library_cannot_lay_out_keeps_the_devices_order(two_slices):
  devices = v4_slice((2, 2, 2))[:6]  # not a whole cuboid
  assert np.array_equal(sharding.device_grid(devices, (3, 2)), _plain(devices, (3, 2)))
  unequal = two_slices[:6]  # slices of 3 and 3 chips, neither a whole 2x2 layer
  assert np.array_equal(sharding.device_grid(unequal, (3, 2)), _plain(unequal, (3, 2)))


def test_cpu_devices_keep_their_order():
  mesh = together.make_mesh(4, 2)
  assert np.array_equal(mesh.devices, _plain(jax.devices(), (4, 2)))
