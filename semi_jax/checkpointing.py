"""Checkpoints that are either complete and verified or ignored: orbax saves plus a content fingerprint.

Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once every
file is written, so a process killed mid-save leaves a temporary directory (removed at the next start), never
a `<step>` directory that looks valid. Next to the state every checkpoint stores a fingerprint: per leaf, the
wrapping uint32 sum of its raw bits. A restore recomputes it.

In a run of several processes the restore is one decision for all: every process reads and verifies the
candidate itself, the outcomes are combined, and the newest step that every process verified wins. A content
error (fingerprint mismatch, unreadable structure, a truncated or garbled file) on any process moves the
checkpoint aside to `corrupt-<step>-<time>` (after a barrier, by process 0) and the next older one is tried;
nothing is ever deleted by that fallback. An I/O error (permissions, network, a transient storage status) is
retried with backoff and, if it persists, stops every process with a message naming the path, without moving
anything: a storage hiccup never costs a good checkpoint, and no host ever falls back alone.
"""
from __future__ import annotations

import json
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


class CheckpointContentError(ValueError):
  """A checkpoint that was read but whose content is wrong."""


class CheckpointIOError(OSError):
  """A checkpoint that could not be read because of I/O errors that persisted through the retries."""


OK, CONTENT, IO = 0, 1, 2  # outcomes of reading a checkpoint on one process
# Status names of transient storage errors (gRPC / absl status codes as tensorstore and GCS clients print them).
# (No bare HTTP codes: "429" or "503" may be part of a path.)
TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "Connection reset",
                     "connection reset", "timed out", "Timeout")


def is_io_error(error: BaseException) -> bool:
  """Whether reading failed because of the storage (worth retrying; never a reason to quarantine) rather than
  the checkpoint's content. A missing file inside a checkpoint is content; OSErrors such as permission,
  connection and timeout errors, and transient status codes anywhere in the cause chain, are I/O."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, CheckpointContentError):
      return False
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, IsADirectoryError,
                                                               NotADirectoryError)):
      return True
    if any(m in str(error) for m in TRANSIENT_MARKERS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _local_copy(x):
  """This process's full copy of a replicated array (the array itself otherwise)."""
  return x.addressable_data(0) if isinstance(x, jax.Array) and x.is_fully_replicated else x


# The restore decision is exchanged through the coordination service's key-value store (host to host), not
# through device collectives: a process that raises right after a device collective tears its devices down at
# exit (jax's atexit clears the backends before jax.distributed's shutdown barrier), which can leave the other
# processes waiting inside that collective forever.
_exchanges = [0]


def _client():
  return ocp.multihost.get_jax_distributed_client()


def _timeout_ms() -> int:
  return ocp.multihost.coordination_timeout() * 1000


def _exchange(name: str, value) -> list:
  """Every process's JSON-serialisable `value`, in process order (all processes must call it in turn)."""
  if jax.process_count() == 1:
    return [value]
  _exchanges[0] += 1
  key = f"semi_jax/checkpointing/{_exchanges[0]}-{name}"
  _client().key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
  return [json.loads(_client().blocking_key_value_get(f"{key}/{p}", _timeout_ms()))
          for p in range(jax.process_count())]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    _exchanges[0] += 1
    _client().wait_at_barrier(f"semi_jax/checkpointing/{_exchanges[0]}-{name}", _timeout_ms())


def _agreed_steps(steps: list[int]) -> list[int]:
  """Process 0's list of steps, on every process (listings on a shared file system may differ for a moment)."""
  return [int(s) for s in _exchange("steps", [int(s) for s in steps])[0]]


class Checkpointer:
  """Saves every N steps (asynchronously), keeps the last K, restores the newest verified checkpoint."""

  def __init__(self, directory: str, keep: int, read_attempts: int = 4, retry_delay_s: float = 2.0):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._read_attempts, self._retry_delay_s = read_attempts, retry_delay_s
    # Reads by this process alone: the manager's restore ends in a barrier of all processes, where the others
    # would wait forever for a process whose read failed. The decision is then taken together (`restore`).
    me = jax.process_index()
    self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=(
        ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})))
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

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has reached the step at which a preemption notice (a SIGTERM on any host, or
    the notice JAX's coordination service delivers on Cloud TPU) says to save and stop: JAX's preemption
    sync point, through orbax. Always False in a single process. Call it after every step, with the same
    step on every process."""
    return self._manager.reached_preemption(int(step))

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore_verified(self, step: int, template):
    if not epath.Path(self.path(step)).exists():  # listed on another host (or a moment ago) but not seen here
      raise OSError(f"{self.path(step)} does not exist on this host")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._reader.restore(epath.Path(self.path(step)), args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract), FINGERPRINT: ocp.args.JsonRestore()}))
    state = restored[STATE]
    expected = restored[FINGERPRINT]["leaf_bit_sums"]
    # This process's own copy of the (replicated) state: no collective, so a process that fails here cannot
    # leave the others waiting inside a device computation.
    sums, finite = jax.device_get(state_digest(jax.tree.map(_local_copy, state)))
    if [int(s) for s in sums] != [int(s) for s in expected]:
      bad = [i for i, (a, b) in enumerate(zip(sums, expected)) if int(a) != int(b)]
      raise CheckpointContentError(f"content fingerprint mismatch in {len(bad)} of {len(expected)} arrays")
    if not finite:
      raise CheckpointContentError("it holds NaN or Inf values")
    return state

  def _read(self, step: int, template):
    """(outcome, state, reason) of reading `step` on this process; I/O errors are retried with backoff."""
    delay = self._retry_delay_s
    for attempt in range(1, self._read_attempts + 1):
      try:
        return OK, self._restore_verified(step, template), ""
      except Exception as e:  # noqa: BLE001 - classified below; nothing escapes without a decision
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if not is_io_error(e):
          return CONTENT, None, reason
        if attempt == self._read_attempts:
          return IO, None, reason
        logging.warning("Reading checkpoint %s failed (attempt %d of %d, %s); retrying in %.1f s.",
                        self.path(step), attempt, self._read_attempts, reason, delay)
        time.sleep(delay)
        delay *= 2

  def quarantine(self, step: int, reason: str) -> str:
    """Moves checkpoint `step` aside to corrupt-<step>-<time> (kept for inspection) and warns. Collective in
    a multi-process run: after a barrier (nobody reads it any more) process 0 renames it (on GCS a copy and
    delete), then a second barrier (nobody lists the directory before the move is done)."""
    src = self.path(step)
    dst = os.path.join(self.directory, f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    _barrier(f"quarantine-{step}-begin")
    if jax.process_index() == 0 and epath.Path(src).exists():
      epath.Path(src).rename(dst)
    _barrier(f"quarantine-{step}-end")
    logging.warning("Checkpoint %s is unreadable (%s); moved it to %s and falling back to the previous one.",
                    src, reason, dst)
    self._manager.reload()
    return dst

  def restore(self, template, step=None):
    """The newest (or the given) checkpoint that every process loads and verifies, with the shapes, dtypes
    and shardings of `template`; None when there is none.

    Decided together: the candidate steps are process 0's listing; every process reads and verifies each
    candidate itself and the outcomes are combined, so all processes start from the same step or all stop.
    A content error on any process (fingerprint mismatch, unreadable structure) moves the checkpoint aside
    (never deleted) and the next older one is tried; an I/O error that persists through the retries stops
    the run with CheckpointIOError naming the path, and moves nothing."""
    steps = [step] if step is not None else _agreed_steps(self.all_steps())[::-1]
    for s in steps:
      logging.info("Restoring checkpoint of step %d from %s", s, self.directory)
      outcome, state, reason = self._read(s, template)
      outcomes = _exchange(f"outcome-{s}", outcome)
      failed = [p for p, o in enumerate(outcomes) if o != OK]
      if not failed:
        return state
      if IO in outcomes:
        io_procs = [p for p, o in enumerate(outcomes) if o == IO]
        mine = f" Here: {reason}." if outcome == IO else " See the log of that process for the error."
        raise CheckpointIOError(
            f"checkpoint {self.path(s)} could not be read by process(es) {io_procs} after "
            f"{self._read_attempts} attempts (an I/O error, not damaged content).{mine} Nothing was moved or "
            "deleted; check that every host can read the workdir (permissions, network, storage quota) and "
            "rerun the same command to resume.")
      if outcome == OK:
        reason = f"content error on process(es) {failed}"
      self.quarantine(s, reason)
    return None

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
    self._reader.close()
