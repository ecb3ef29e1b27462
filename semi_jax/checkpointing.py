"""Checkpoints that are either complete and verified or ignored: orbax saves plus a content fingerprint.

Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once every
file is written, so a process killed mid-save leaves a temporary directory (removed at the next start), never
a `<step>` directory that looks valid. Next to the state every checkpoint stores a fingerprint: per leaf, the
wrapping uint32 sum of its raw bits (per leaf and run for the stacked state of runs trained together, so that each
process verifies the runs it holds). A restore recomputes it.

In a run of several processes the restore is one decision for all: every process reads and verifies the
candidate itself, the outcomes are combined, and the newest step that every process verified wins. What a failed
read means decides what happens:
- damaged content, positively identified (fingerprint mismatch, NaN, a file cut short or missing inside the
  checkpoint, data the store reports lost): the checkpoint is moved aside to `corrupt-<step>-<time>` (after a
  barrier, by process 0) and the next older one is tried; nothing is ever deleted;
- the storage (permissions, network, a transient status): retried with backoff; if it persists every process
  stops with a message naming the path, and nothing is moved;
- a sound checkpoint of another shape or structure (another config, e.g. a new bank.size): every process stops
  with a message naming the arrays that differ, and nothing is moved (`CheckpointMismatchError`). The one change
  of shape that is resumed is the padded run count of a stacked state (another run axis): the real runs are
  restored, the padding rebuilt;
- anything else: every process stops with the error, and nothing is moved.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from semi_jax import distributed, faults

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
  return sums, _all_finite(state)


def _all_finite(state):
  """Whether every floating-point value of the state is finite, except the divergence guard's record of the loss
  terms of a non-finite step (`state.Guard`), which is NaN by nature."""
  if getattr(state, "guard", None) is not None:
    state = state.replace(guard=state.guard.replace(terms={}))
  finite = jnp.array(True)
  for x in jax.tree.leaves(state):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite = finite & jnp.all(jnp.isfinite(x))
  return finite


def _run_sums(x):
  """uint32[runs]: the wrapping bit sum of each run's slice of a leaf with a leading run axis."""
  bits = _leaf_bits(x)
  return jnp.sum(bits.reshape(bits.shape[0], -1), axis=1, dtype=jnp.uint32)


def _run_digest(state):
  leaves = jax.tree.leaves(state)
  return jnp.stack([_run_sums(x) for x in leaves]), _all_finite(state)


def run_digest(state):
  """(fingerprint [leaves, runs], all_finite) of a stacked state (a leading run axis on every leaf): the bit sum
  of each run's slice of each leaf, so that a process can verify the runs it holds. Replicated on every device of
  the state's mesh, so that every process can read it."""
  mesh = jax.tree.leaves(state)[0].sharding.mesh
  return _digest_on(mesh)(state)


@functools.cache
def _digest_on(mesh):
  return jax.jit(_run_digest, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


_shard_sums = jax.jit(_run_sums)


class NonFiniteStateError(FloatingPointError):
  """The state to be saved holds NaN or Inf: it is never written."""


class CheckpointContentError(ValueError):
  """A checkpoint that was read but whose content is wrong."""


class CheckpointIOError(OSError):
  """A checkpoint that could not be read because of I/O errors that persisted through the retries."""


class CheckpointMismatchError(ValueError):
  """A sound checkpoint whose arrays do not have the shapes or the structure the run expects: written with
  another config. Nothing is moved."""


class CheckpointReadError(RuntimeError):
  """A checkpoint that could not be read for a reason that is neither the storage nor provably damaged content.
  Nothing is moved."""


OK, CONTENT, IO, MISMATCH, UNKNOWN = 0, 1, 2, 3, 4  # outcomes of reading a checkpoint on one process
# Status names of storage errors (gRPC / absl status codes as tensorstore and GCS clients print them): the
# storage, not the checkpoint. (No bare HTTP codes: "429" or "503" may be part of a path.)
TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "Connection reset",
                     "connection reset", "timed out", "Timeout", "PERMISSION_DENIED", "UNAUTHENTICATED")
# What tensorstore and orbax say of a checkpoint whose files are cut short, garbled or incomplete.
CONTENT_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "checksum", "Found incomplete checkpoint", "corrupt",
                   "Unexpected end", "JSONDecodeError", "Expecting value", "Invalid control character")
# What orbax says of a sound checkpoint of another shape or tree structure.
MISMATCH_MARKERS = ("is not compatible with the stored shape", "tree structures do not match")


def is_io_error(error: BaseException) -> bool:
  """Whether reading failed because of the storage (worth retrying; never a reason to quarantine) rather than
  the checkpoint's content. A missing file inside a checkpoint is content; OSErrors such as permission,
  connection and timeout errors, and storage status codes anywhere in the cause chain, are I/O."""
  for e in faults.error_chain(error):
    if isinstance(e, (CheckpointContentError, CheckpointMismatchError)):
      return False
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
      return True
    if any(m in str(e) for m in TRANSIENT_MARKERS):
      return True
  return False


def classify(error: BaseException) -> int:
  """The outcome a read error stands for: IO, MISMATCH, CONTENT (positively identified damage) or UNKNOWN."""
  if is_io_error(error):
    return IO
  for e in faults.error_chain(error):
    if isinstance(e, CheckpointMismatchError) or any(m in str(e) for m in MISMATCH_MARKERS):
      return MISMATCH
    if isinstance(e, (CheckpointContentError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                      json.JSONDecodeError)) or any(m in str(e) for m in CONTENT_MARKERS):
      return CONTENT
  return UNKNOWN


def _local_copy(x):
  """This process's full copy of a replicated array (the array itself otherwise)."""
  return x.addressable_data(0) if isinstance(x, jax.Array) and x.is_fully_replicated else x


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict:
  """{path: shape} of the array leaves of a tree (a state, or orbax's metadata of a saved one)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


# Which config fields give the arrays of the state their shapes (for messages).
_SHAPE_FIELDS = (("semi/bank", "bank.size, bank.dtype"), ("guard/recent", "train.nonfinite_window"),
                 ("guard/terms", "ssl.algo and the component switches"), ("params", "model.*"),
                 ("ema_params", "model.*"), ("opt_state", "model.*"), ("batch_stats", "model.*"),
                 ("semi", "the data set's classes or the model's feature size"))


def describe_mismatch(saved: dict, expected: dict, skip_leading: bool = False) -> list[str]:
  """Lines naming the arrays whose shapes (all but the leading run axis with `skip_leading`) or presence differ
  between a saved state and the one a run expects, with the config fields that set them."""
  lines = []
  for path in sorted(set(saved) | set(expected)):
    a, b = saved.get(path), expected.get(path)
    if a is not None and b is not None and (a[1:] == b[1:] if skip_leading else a == b):
      continue
    fields = next((f for prefix, f in _SHAPE_FIELDS if path.startswith(prefix)), "the config")
    lines.append(f"{path}: saved {a if a is not None else 'absent'}, expected {b if b is not None else 'absent'} "
                 f"(set by {fields})")
  return lines


class Checkpointer:
  """Saves every N steps (asynchronously), keeps the last K, restores the newest verified checkpoint.

  `runs`: for the stacked state of runs trained together, the number of real runs (the state's leading run axis
  may be padded beyond it to fill the mesh's run axis); None for a run alone."""

  def __init__(self, directory: str, keep: int, read_attempts: int = 4, retry_delay_s: float = 2.0,
               runs: int | None = None):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._read_attempts, self._retry_delay_s = read_attempts, retry_delay_s
    self.runs = runs
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
    if self.runs is None:
      sums, finite = jax.device_get(state_digest(state))
      fingerprint = {"leaf_bit_sums": [int(s) for s in sums]}
    else:
      sums, finite = jax.device_get(run_digest(state))
      fingerprint = {"runs": self.runs, "run_bit_sums": [[int(x) for x in sums[:, r]] for r in range(self.runs)]}
    if not finite:
      self.wait()
      raise NonFiniteStateError(
          f"the state at step {step} holds NaN or Inf values; it was not saved. The last good checkpoint "
          f"(step {self.latest_step()}) in {self.directory} is kept.")
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), FINGERPRINT: ocp.args.JsonSave(fingerprint)})
    return self._manager.save(int(step), args=args, force=force)

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has reached the step at which a preemption notice (a SIGTERM on any host, or
    the notice JAX's coordination service delivers on Cloud TPU) says to save and stop: JAX's preemption
    sync point, through orbax. Always False in a single process. Call it after every step, with the same
    step on every process."""
    return self._manager.reached_preemption(int(step))

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _saved_shapes(self, step: int) -> dict:
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(self.path(step)) / STATE)
    return _shapes(getattr(metadata, "tree", metadata))

  def _restore_verified(self, step: int, template):
    if not epath.Path(self.path(step)).exists():  # listed on another host (or a moment ago) but not seen here
      raise OSError(f"{self.path(step)} does not exist on this host")
    path = epath.Path(self.path(step))
    fingerprint = self._reader.restore(path, args=ocp.args.Composite(**{FINGERPRINT: ocp.args.JsonRestore()}))[
        FINGERPRINT]
    if fingerprint is None:
      raise CheckpointContentError("its fingerprint is missing")
    saved, expected = self._saved_shapes(step), _shapes(template)
    # A checkpoint written before the divergence guard was part of the state: restored without it.
    legacy_guard = not any(p.startswith("guard/") for p in saved) and template.guard is not None
    if legacy_guard:
      template = template.replace(guard=None)
      expected = _shapes(template)
    stacked = "run_bit_sums" in fingerprint
    if self.runs is not None and not stacked:
      return self._restore_unstacked(path, fingerprint, saved, template)
    mismatch = describe_mismatch(saved, expected, skip_leading=stacked)
    if mismatch:
      raise CheckpointMismatchError("; ".join(mismatch[:4]) + (f" and {len(mismatch) - 4} more" if len(mismatch) > 4
                                                               else ""))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    if stacked:
      if fingerprint["runs"] != self.runs:
        raise CheckpointMismatchError(f"it holds {fingerprint['runs']} runs, this group has {self.runs}")
      # Another padded run count (another run axis) reads the real runs and pads with zeros: re-padded below.
      strict = all(saved[p][0] == expected[p][0] for p in expected)
      state = self._read_state(path, abstract, strict)
      self._verify_runs(state, fingerprint["run_bit_sums"])
      state = pad_runs(state, self.runs)
    else:
      state = self._read_state(path, abstract, True)
      # This process's own copy of the (replicated) state: no collective, so a process that fails here cannot
      # leave the others waiting inside a device computation.
      self._verify_leaves(jax.tree.map(_local_copy, state), fingerprint["leaf_bit_sums"])
    if legacy_guard:
      logging.warning("Checkpoint %s predates the divergence guard in the state: its skipped-step count starts "
                      "at 0.", self.path(step))
    return state

  def _read_state(self, path, abstract, strict: bool):
    return self._reader.restore(path, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract, strict=strict)}))[STATE]

  def _verify_leaves(self, state, expected):
    sums, finite = jax.device_get(state_digest(state))
    if [int(s) for s in sums] != [int(s) for s in expected]:
      bad = [i for i, (a, b) in enumerate(zip(sums, expected)) if int(a) != int(b)]
      raise CheckpointContentError(f"content fingerprint mismatch in {len(bad)} of {len(expected)} arrays")
    if not finite:
      raise CheckpointContentError("it holds NaN or Inf values")

  def _verify_runs(self, state, expected):
    """Checks the runs of the stacked state that this process holds against their fingerprints (no collective:
    each shard is summed where it lies)."""
    bad = set()
    terms = {id(x) for x in jax.tree.leaves(state.guard.terms)} if getattr(state, "guard", None) else set()
    for index, leaf in enumerate(jax.tree.leaves(state)):
      for shard in leaf.addressable_shards:
        first = shard.index[0].start or 0
        sums = jax.device_get(_shard_sums(shard.data))
        for offset, value in enumerate(sums):
          run = first + offset
          if run < len(expected) and int(value) != int(expected[run][index]):
            bad.add(run)
        if (id(leaf) not in terms and jnp.issubdtype(shard.data.dtype, jnp.inexact)
            and not bool(jnp.all(jnp.isfinite(shard.data)))):
          raise CheckpointContentError("it holds NaN or Inf values")
    if bad:
      raise CheckpointContentError(f"content fingerprint mismatch in run(s) {sorted(bad)}")

  def _restore_unstacked(self, path, fingerprint, saved, template):
    """A stacked state saved with one fingerprint for the whole padded state (semi_jax before per-run
    fingerprints): read whole on every device, verified, then cut to the real runs and re-padded."""
    expected = _shapes(template)
    mismatch = describe_mismatch(saved, expected, skip_leading=True)
    if mismatch:
      raise CheckpointMismatchError("; ".join(mismatch[:4]))
    leading = {p: s[0] for p, s in saved.items()}
    mesh = jax.tree.leaves(template)[0].sharding.mesh
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct((leading["/".join(_key_name(k) for k in p)],) + x.shape[1:], x.dtype,
                                          sharding=repl), template)
    state = self._read_state(path, abstract, True)
    self._verify_leaves(jax.tree.map(_local_copy, state), fingerprint["leaf_bit_sums"])
    target = jax.tree.leaves(template)[0].shape[0]
    return pad_runs(jax.tree.map(lambda x: x[:self.runs], state), self.runs, target,
                    jax.tree.map(lambda x: x.sharding, template))

  def _read(self, step: int, template):
    """(outcome, state, reason) of reading `step` on this process; I/O errors are retried with backoff."""
    delay = self._retry_delay_s
    for attempt in range(1, self._read_attempts + 1):
      try:
        return OK, self._restore_verified(step, template), ""
      except Exception as e:  # noqa: BLE001 - classified below; nothing escapes without a decision
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:600]
        outcome = classify(e)
        if outcome != IO:
          if outcome == UNKNOWN:
            logging.error("Reading checkpoint %s failed", self.path(step), exc_info=True)
          return outcome, None, reason
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
    distributed.barrier(f"quarantine-{step}-begin")
    if jax.process_index() == 0 and epath.Path(src).exists():
      epath.Path(src).rename(dst)
    distributed.barrier(f"quarantine-{step}-end")
    logging.warning("Checkpoint %s is unreadable (%s); moved it to %s and falling back to the previous one.",
                    src, reason, dst)
    self._manager.reload()
    return dst

  def restore(self, template, step=None):
    """(step, state) of the newest (or the given) checkpoint that every process loads and verifies, with the
    shapes, dtypes and shardings of `template`; None when there is none.

    Decided together: the candidate steps are process 0's listing; every process reads and verifies each
    candidate itself and the outcomes are combined, so all processes start from the same step or all stop.
    Provably damaged content on any process (fingerprint mismatch, a file cut short) moves the checkpoint aside
    (never deleted) and the next older one is tried; an I/O error that persists through the retries stops the
    run with CheckpointIOError, a checkpoint of other shapes with CheckpointMismatchError, any other error with
    CheckpointReadError, each naming the path and moving nothing."""
    steps = [step] if step is not None else distributed.agreed("checkpoint-steps", self.all_steps())[::-1]
    for s in steps:
      logging.info("Restoring checkpoint of step %d from %s", s, self.directory)
      outcome, state, reason = self._read(s, template)
      outcomes = distributed.exchange(f"checkpoint-outcome-{s}", [outcome, reason])
      failed = [p for p, (o, _) in enumerate(outcomes) if o != OK]
      if not failed:
        return s, state
      worst = lambda kind: [p for p, (o, _) in enumerate(outcomes) if o == kind]
      first = lambda kind: next(r for o, r in outcomes if o == kind)
      if worst(IO):
        mine = f" Here: {reason}." if outcome == IO else " See the log of that process for the error."
        raise CheckpointIOError(
            f"checkpoint {self.path(s)} could not be read by process(es) {worst(IO)} after "
            f"{self._read_attempts} attempts (an I/O error, not damaged content).{mine} Nothing was moved or "
            "deleted; check that every host can read the workdir (permissions, network, storage quota) and "
            "rerun the same command to resume.")
      if worst(MISMATCH):
        raise CheckpointMismatchError(
            f"checkpoint {self.path(s)} is sound but was written with another config: {first(MISMATCH)}. Nothing "
            "was moved; resume with the config that wrote it, or start this config in another --workdir.")
      if worst(UNKNOWN):
        raise CheckpointReadError(
            f"checkpoint {self.path(s)} could not be read by process(es) {worst(UNKNOWN)}: {first(UNKNOWN)}. This "
            "is neither a storage error nor provably damaged content, so nothing was moved; fix the cause and "
            "rerun the same command, or move that checkpoint aside by hand to fall back to an older one.")
      self.quarantine(s, reason if outcome == CONTENT else f"content error on process(es) {failed}: "
                      f"{first(CONTENT)}")
    return None

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
    self._reader.close()


def pad_runs(state, runs: int, target: int | None = None, shardings=None):
  """A stacked state whose rows from `runs` on (the padding of the run axis, possibly zeros from a restore of
  another run count) are copies of the last real run, as a group pads them; with `target`, first cut or extended
  to that many rows. `shardings`: those of the result (default: the state's)."""
  shardings = jax.tree.map(lambda x: x.sharding, state) if shardings is None else shardings

  def pad(x):
    size = x.shape[0] if target is None else target
    rows = jnp.minimum(jnp.arange(size), runs - 1)
    return jnp.take(x[:runs], rows, axis=0)

  return jax.jit(lambda s: jax.tree.map(pad, s), out_shardings=shardings)(state)
