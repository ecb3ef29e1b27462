"""One process of a multi-process job that makes the device views of a fixed source batch (device_augment_test).

python tests/device_augment_worker.py OUT.npz   (with the environment of `processes.child_env`)

Every process feeds its own slice of the global batch, laid out for its devices as the trainer lays it out, and
makes the views in one jitted call on the global mesh; process 0 writes the four view groups, gathered, to OUT.
"""
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from semi_jax import device_augment, distributed, input_pipeline, sharding, train
from semi_jax.train_step import split_views

# The batch and key device_augment_test compares with, made the same way there.
BATCH, UNLABELED, SIZE, STEP_SEED = 8, 16, 8, 3


def source_batch():
  """(x, u, x positions, u positions) of the global batch."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
  u = rng.integers(0, 256, (UNLABELED, SIZE, SIZE, 3), dtype=np.uint8)
  return x, u, np.arange(BATCH, dtype=np.int32) + 40, np.arange(UNLABELED, dtype=np.int32) * 3 + 5


def make_views(blocks: int):
  """The jitted views of a source batch laid out for `blocks` devices, as the four groups (global arrays)."""
  def views(images, positions, step_key):
    made = device_augment.train_images(images, positions, step_key, device_augment.Settings(), BATCH, UNLABELED,
                                       blocks)
    return split_views(made, BATCH, UNLABELED, blocks)
  return jax.jit(views)


def global_batch(mesh, x, u, x_positions, u_positions):
  """(images, positions) on `mesh`, every process feeding its slice laid out for its own devices."""
  process, count = jax.process_index(), jax.process_count()
  part = lambda a: np.split(a, count)[process]
  blocks = train.local_blocks(mesh)
  local = {"images": input_pipeline.pack_views([part(x), part(u)], blocks),
           "positions": input_pipeline.pack_views([part(x_positions), part(u_positions)], blocks)}
  batch = sharding.to_global(local, mesh)
  return batch["images"], batch["positions"]


def views_on(mesh, x, u, x_positions, u_positions):
  """The four view groups (global arrays) of the batch on `mesh`."""
  return make_views(mesh.devices.size)(*global_batch(mesh, x, u, x_positions, u_positions),
                                       jax.random.key(STEP_SEED))


def main(out: str) -> None:
  distributed.maybe_initialize()
  views = views_on(sharding.make_mesh(), *source_batch())
  gathered = [np.asarray(multihost_utils.process_allgather(v, tiled=True)) for v in views]
  if jax.process_index() == 0:
    np.savez(out, *gathered)


if __name__ == "__main__":
  main(sys.argv[1])
