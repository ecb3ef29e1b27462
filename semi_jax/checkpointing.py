"""A thin orbax wrapper: save every N steps, keep the last K, restore the newest into a sharded template."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, force: bool = False) -> bool:
    saved = self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)
    return saved

  def restore(self, template, step=None):
    """Restores `step` (default: newest) with the shapes, dtypes and shardings of `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    logging.info("Restoring checkpoint of step %d from %s", step, self.directory)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
