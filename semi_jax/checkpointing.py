"""Checkpoints that are either complete and verified or ignored: orbax saves plus a content fingerprint.

Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once every
file is written, so a process killed mid-save leaves a temporary directory (removed at the next start), never
a `<step>` directory that looks valid. Next to the state every checkpoint stores a fingerprint: per leaf, the
wrapping uint32 sum of its raw bits. A restore recomputes it; a checkpoint that fails to load or whose
fingerprint differs (a truncated or garbled file) is moved aside to `corrupt-<step>-<time>` with a warning,
and the next older one is tried. Nothing is ever deleted by that fallback.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

STATE = "state"
FINGERPRINT = "fingerprint"


def _leaf_bits(x):
  """The raw bits of an array as uint32 values (bools and 1-byte types widened, 8-byte types split)."""
  x = jnp.asarray(x)
  if x.dtype.itemsize == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if x.dtype.itemsize == 1:
    return x.astype(jnp.uint8).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> a trailing axis of two words


@jax.jit
def state_digest(state):
  """(fingerprint, all_finite): per-leaf wrapping sums of the raw bits (order-independent, so exact on any
  mesh) and whether every floating-point value of the state is finite. One small device computation."""
  leaves = jax.tree.leaves(state)
  sums = jnp.stack([jnp.sum(_leaf_bits(x), dtype=jnp.uint32) for x in leaves]) if leaves else jnp.zeros(
      (0,), jnp.uint32)
  finite = jnp.array(True)
  for x in leaves:
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite = finite & jnp.all(jnp.isfinite(x))
  return sums, finite


class NonFiniteStateError(FloatingPointError):
  """The state to be saved holds NaN or Inf: it is never written."""


class Checkpointer:
  """Saves every N steps (asynchronously), keeps the last K, restores the newest verified checkpoint."""

  def __init__(self, directory: str, keep: int):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True))

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, force: bool = False) -> bool:
    """Writes `state` unless any of its values is non-finite (then raises NonFiniteStateError)."""
    sums, finite = jax.device_get(state_digest(state))
    if not finite:
      self.wait()
      raise NonFiniteStateError(
          f"the state at step {step} holds NaN or Inf values; it was not saved. The last good checkpoint "
          f"(step {self.latest_step()}) in {self.directory} is kept.")
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 FINGERPRINT: ocp.args.JsonSave({"leaf_bit_sums": [int(s) for s in sums]})})
    return self._manager.save(int(step), args=args, force=force)

  def _restore_verified(self, step: int, template):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract), FINGERPRINT: ocp.args.JsonRestore()}))
    state = restored[STATE]
    expected = restored[FINGERPRINT]["leaf_bit_sums"]
    sums, finite = jax.device_get(state_digest(state))
    if [int(s) for s in sums] != [int(s) for s in expected]:
      bad = [i for i, (a, b) in enumerate(zip(sums, expected)) if int(a) != int(b)]
      raise ValueError(f"content fingerprint mismatch in {len(bad)} of {len(expected)} arrays")
    if not finite:
      raise ValueError("it holds NaN or Inf values")
    return state

  def quarantine(self, step: int, reason: str) -> str:
    """Moves checkpoint `step` aside to corrupt-<step>-<time> (kept for inspection) and warns."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and epath.Path(src).exists():
      epath.Path(src).rename(dst)
    logging.warning("Checkpoint %s is unreadable (%s); moved it to %s and falling back to the previous one.",
                    src, reason, dst)
    self._manager.reload()
    return dst

  def restore(self, template, step=None):
    """The newest (or the given) checkpoint that loads and verifies, with the shapes, dtypes and shardings of
    `template`; None when there is none. Unreadable checkpoints are moved aside, never deleted."""
    steps = [step] if step is not None else self.all_steps()[::-1]
    for s in steps:
      logging.info("Restoring checkpoint of step %d from %s", s, self.directory)
      try:
        return self._restore_verified(s, template)
      except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means it is unusable
        self.quarantine(s, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    return None

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
