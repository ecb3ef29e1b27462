"""Balanced confidence-decay memory bank (SeMi, section "Balanced confidence-decay memory bank").

The bank keeps, for every class c, the K most confident features pushed so far with pseudo-label c.
It is a pytree of fixed-size arrays and every function here is pure and jittable, so the bank lives
inside the jitted train step (replicated) and never leaves the device.

Layout and invariants:
- Features stay where they were written: ``feats[c, s]`` is storage slot s of class c, and ``slot[c, k]`` names
  the storage slot of the k-th most confident entry. ``conf``, ``filled`` and ``fresh`` are in that rank order.
  A push therefore writes only the entering candidates' features (in place when the bank is donated) and a
  decay moves none; reordering a [C, K, D] table on every step cost more than all the rest of the update.
  ``ranked_feats`` gives the features in rank order. Each ``slot[c]`` is a permutation of [0, K).
- A feature and its confidence always move together (the reference implementation lets the two drift apart).
- Every row ``conf[c]`` is sorted in descending order. ``push`` relies on this to merge instead of sort,
  and every function here preserves it. Among equal confidences the older entry comes first.
- Empty slots hold confidence 0 and ``filled=False``. Confidences of filled slots are > 0.
- ``fresh[c, k]`` marks an entry written since the last ``decay``; ``decay`` shrinks only the others, so
  stale entries can eventually be displaced (the reference matched stale entries by float value).

Sharding: the bank is meant to be replicated and the candidates batch-sharded. Everything works on
global arrays, so the result does not depend on the number of devices. On a mesh with Explicit axes the
candidates are gathered to every device first, because XLA sorts only along unsharded axes.
"""
import math
from numbers import Real

import jax
import jax.numpy as jnp
from flax import struct

from semi_jax import sharding

DTYPES = ("float32", "bfloat16")  # storage dtypes of the features (config field bank.dtype)

@struct.dataclass
class MemoryBank:
  """Per-class top-K store of features with confidences.

  Attributes:
    feats: [C, K, D] stored features, in storage order.
    conf: f32[C, K] confidences in rank order: each row sorted in descending order.
    filled: bool[C, K] the k-th ranked entry holds a pushed feature.
    fresh: bool[C, K] the k-th ranked entry was written since the last ``decay``.
    slot: int32[C, K] storage slot in ``feats`` of the k-th ranked entry.
  """
  feats: jax.Array
  conf: jax.Array
  filled: jax.Array
  fresh: jax.Array
  slot: jax.Array

  @classmethod
  def from_ranked(cls, feats, conf, filled, fresh) -> "MemoryBank":
    """A bank from arrays that are all in rank order (feature k of class c stored in slot k)."""
    num_classes, size = jnp.shape(conf)
    return cls(feats=jnp.asarray(feats), conf=jnp.asarray(conf), filled=jnp.asarray(filled),
               fresh=jnp.asarray(fresh), slot=_identity_slots(num_classes, size))

  @property
  def num_classes(self) -> int:
    return self.conf.shape[0]

  @property
  def size(self) -> int:
    return self.conf.shape[1]

  @property
  def dim(self) -> int:
    return self.feats.shape[2]


def init_bank(num_classes: int, size: int, dim: int, dtype=jnp.float32) -> MemoryBank:
  """Empty bank: zero features (in ``dtype``), zero float32 confidences, no slot filled or fresh."""
  for name, value in (("num_classes", num_classes), ("size", size), ("dim", dim)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"init_bank: {name} must be a positive int, got {value!r}.")
  return MemoryBank(
      feats=jnp.zeros((num_classes, size, dim), dtype),
      conf=jnp.zeros((num_classes, size), jnp.float32),
      filled=jnp.zeros((num_classes, size), bool),
      fresh=jnp.zeros((num_classes, size), bool),
      slot=_identity_slots(num_classes, size),
  )


def _identity_slots(num_classes: int, size: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (num_classes, size))


def ranked_feats(bank: MemoryBank) -> jax.Array:
  """[C, K, D] features in rank order: ``ranked_feats(bank)[c, k]`` goes with ``bank.conf[c, k]``."""
  return _take_rows(bank.feats, bank.slot)


def _take_rows(values: jax.Array, index: jax.Array) -> jax.Array:
  """``values[c, index[c, m]]`` for every c, m: like take_along_axis(axis=1) with trailing axes kept.

  Written as one gather from the flattened array: on CPU this is several times faster than
  ``jnp.take_along_axis``. ``index`` must be in range.
  """
  num_rows, length = values.shape[:2]
  flat = values.reshape((num_rows * length,) + values.shape[2:])
  return flat[jnp.arange(num_rows, dtype=jnp.int32)[:, None] * length + index]


def _count_prefix(rows: jax.Array, row_of_query: jax.Array, queries: jax.Array, in_prefix) -> jax.Array:
  """For each query, the length of the prefix of its row ``rows[row_of_query]`` on which
  ``in_prefix(entry, query)`` holds.

  ``rows`` is [C, L], ``row_of_query`` int [M] in [0, C) and ``queries`` [M]; the predicate must be true on a
  prefix of each row (``entry >= q`` on a row sorted in descending order). Branch-free binary search with a
  static number of steps: M gathers per step, and a cost that does not depend on the values (unlike
  ``lax.top_k`` on CPU).
  """
  length = rows.shape[-1]
  flat = rows.reshape(-1)
  row_start = row_of_query * length
  lo = jnp.zeros(queries.shape, jnp.int32)  # in_prefix holds on the row's [:lo]
  hi = jnp.full(queries.shape, length, jnp.int32)  # and fails on its [hi:]
  for _ in range(max(1, math.ceil(math.log2(length + 1)))):
    active = lo < hi
    mid = (lo + hi) // 2
    go_right = active & in_prefix(flat[row_start + jnp.minimum(mid, length - 1)], queries)
    lo = jnp.where(go_right, mid + 1, lo)
    hi = jnp.where(active & ~go_right, mid, hi)
    # Materialise each step: a fused chain of such steps can recompute earlier steps inside later ones
    # (a similar search without barriers took minutes to compile).
    lo, hi = jax.lax.optimization_barrier((lo, hi))
  return lo


def push(bank: MemoryBank, feats: jax.Array, conf: jax.Array, labels: jax.Array,
         valid: jax.Array) -> MemoryBank:
  """Offers a batch of candidates to the bank.

  For every class c the new row holds the K highest-confidence entries of (stored entries of c) and
  (valid candidates with label c). A candidate enters only if it strictly beats the lowest stored
  confidence of its class: stored entries win ties, and among candidates the lower batch index wins.
  Any number of candidates of one class can enter in one call. Written slots become filled and fresh;
  surviving entries keep their flags and move with their features. Rows stay sorted.

  Candidates with ``valid=False``, a label outside [0, C) or a confidence that is not > 0 (NaN included)
  are ignored; such a candidate could never beat an empty slot anyway.

  Args:
    bank: the current bank.
    feats: [N, D] candidate features (cast to the bank's feature dtype).
    conf: [N] candidate confidences, e.g. max of the pseudo-label distribution.
    labels: int [N] candidate classes, e.g. argmax of the pseudo-label distribution.
    valid: bool [N] which candidates to offer (e.g. the pseudo-label mask).

  Returns:
    The updated bank, same shapes and dtypes.

  Cost: one stable sort of the N candidates, one binary search per candidate in its class's row, a few
  [C, K] index operations, and a scatter of the entering candidates' features (at most N rows; in place when
  the bank is donated, as in the train step). No [C, K + N] table is built, no stored feature moves, and the
  cost does not depend on the values (``lax.top_k`` on CPU does).
  """
  num_classes, size, dim = bank.feats.shape
  if feats.ndim != 2 or feats.shape[1] != dim:
    raise ValueError(f"push: feats must be [N, {dim}] to match the bank, got shape {feats.shape}.")
  n = feats.shape[0]
  for name, value in (("conf", conf), ("labels", labels), ("valid", valid)):
    if jnp.shape(value) != (n,):
      raise ValueError(f"push: {name} must have shape ({n},) like feats' batch axis, got {jnp.shape(value)}.")
  feats, conf, labels, valid = (sharding.unshard_if_explicit(jnp.asarray(v))
                               for v in (feats, conf, labels, valid))

  conf = conf.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = valid.astype(bool) & (labels >= 0) & (labels < num_classes) & (conf > 0)

  # Group candidates by class (ignored ones last), most confident first, batch order on ties.
  class_key = jnp.where(valid, labels, num_classes)
  batch_index = jnp.arange(n, dtype=jnp.int32)
  sorted_class, sorted_neg_conf, sorted_index = jax.lax.sort(
      (class_key, -conf, batch_index), num_keys=2, is_stable=True)
  sorted_valid = sorted_class < num_classes
  counts = jnp.zeros(num_classes + 1, jnp.int32).at[class_key].add(1)
  starts = jnp.cumsum(counts) - counts

  # Merge each class's candidates (descending) into its stored row (descending); stored entries go first on
  # ties. A candidate's merged position is its rank among its class's candidates plus the number of stored
  # entries at least as confident (a binary search in one row); a stored entry's is its slot plus the number
  # of its class's candidates that precede it, read off a histogram of those searches. The positions form a
  # permutation of [0, K + n_c) per class, so writing sources into the first K slots has no collisions.
  sorted_class = jnp.minimum(sorted_class, num_classes - 1)  # in range for the gathers; `entering` masks
  sorted_conf = -sorted_neg_conf
  rank = batch_index - starts[sorted_class]
  stored_before = _count_prefix(bank.conf, sorted_class, sorted_conf, lambda entry, q: entry >= q)
  cand_pos = rank + stored_before
  entering = sorted_valid & (cand_pos < size)
  rows = jnp.arange(num_classes, dtype=jnp.int32)[:, None]
  # cands_before[c, k]: candidates of class c that precede stored slot k (those with stored_before <= k).
  histogram = jnp.zeros((num_classes, size + 1), jnp.int32).at[sorted_class, stored_before].add(
      sorted_valid.astype(jnp.int32))
  stored_pos = jnp.arange(size, dtype=jnp.int32) + jnp.cumsum(histogram[:, :size], axis=1)
  # source[c, k] < K: stored slot of class c; >= K: K + sorted candidate index.
  source = jnp.zeros((num_classes, size), jnp.int32).at[rows, stored_pos].set(
      jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (num_classes, size)), mode="drop", unique_indices=True)
  # Candidates that do not enter get distinct out-of-range targets (dropped), so the indices really are unique.
  dropped = num_classes * size + batch_index
  cand_target = jnp.where(entering, sorted_class * size + cand_pos, dropped)
  source = source.reshape(-1).at[cand_target].set(size + batch_index, mode="drop", unique_indices=True)
  source = source.reshape(num_classes, size)

  from_stored = source < size
  stored_rank = jnp.minimum(source, size - 1)
  cand = jnp.maximum(source - size, 0)
  new_conf = jnp.where(from_stored, _take_rows(bank.conf, stored_rank), sorted_conf[cand])
  new_filled = jnp.where(from_stored, _take_rows(bank.filled, stored_rank), True)
  new_fresh = jnp.where(from_stored, _take_rows(bank.fresh, stored_rank), True)

  # The e_c entering candidates of class c evict its e_c lowest-ranked entries (ranks K - e_c .. K - 1) and
  # take over their storage slots; the r-th entering candidate (rank r < e_c in its class) gets the one of
  # rank K - e_c + r. Only their features are written; everything else stays in place.
  entering_count = jnp.zeros(num_classes, jnp.int32).at[sorted_class].add(entering.astype(jnp.int32))
  freed_rank = jnp.clip(size - entering_count[sorted_class] + rank, 0, size - 1)
  cand_storage = bank.slot.reshape(-1)[sorted_class * size + freed_rank]
  new_slot = jnp.where(from_stored, _take_rows(bank.slot, stored_rank), cand_storage[cand])
  write_row = jnp.where(entering, sorted_class * size + cand_storage, dropped)
  new_feats = bank.feats.reshape(num_classes * size, dim).at[write_row].set(
      feats.astype(bank.feats.dtype)[sorted_index], mode="drop", unique_indices=True)
  return MemoryBank(feats=new_feats.reshape(num_classes, size, dim), conf=new_conf, filled=new_filled,
                    fresh=new_fresh, slot=new_slot)


def decay(bank: MemoryBank, beta) -> MemoryBank:
  """Multiplies the confidence of filled, non-fresh entries by ``beta``; then clears all fresh flags.

  Entries written since the previous decay keep their confidence, so stale entries slowly lose to new
  ones. Rows are re-sorted (stable) afterwards. ``beta`` may be a traced scalar; a Python number must lie
  in [0, 1].
  """
  if isinstance(beta, Real) and not 0 <= beta <= 1:
    raise ValueError(f"decay: beta must lie in [0, 1] (e.g. 0.99), got {beta}.")
  stale = bank.filled & ~bank.fresh
  conf = jnp.where(stale, bank.conf * jnp.asarray(beta, bank.conf.dtype), bank.conf)
  slots = jnp.broadcast_to(jnp.arange(bank.size, dtype=jnp.int32), conf.shape)
  _, order = jax.lax.sort((-conf, slots), dimension=1, num_keys=1, is_stable=True)
  return MemoryBank(
      feats=bank.feats,  # features stay in their storage slots; only the ranking changes
      conf=_take_rows(conf, order),
      filled=_take_rows(bank.filled, order),
      fresh=jnp.zeros_like(bank.fresh),
      slot=_take_rows(bank.slot, order),
  )


def _filled_count(bank: MemoryBank) -> jax.Array:
  return jnp.sum(bank.filled, axis=1, dtype=jnp.int32)


def prototypes(bank: MemoryBank) -> tuple[jax.Array, jax.Array]:
  """Per-class mean of the FILLED features (empty slots are ignored).

  Returns:
    (protos f32[C, D], has_proto bool[C]); a class with no entry gets a zero prototype and False.
  """
  # `filled` is in rank order, the features in storage order: move the (small) mask to storage order.
  rows = jnp.arange(bank.num_classes, dtype=jnp.int32)[:, None]
  weights = jnp.zeros(bank.conf.shape, jnp.float32).at[rows, bank.slot].set(
      bank.filled.astype(jnp.float32), unique_indices=True)
  count = _filled_count(bank)
  sums = jnp.einsum("ck,ckd->cd", weights, bank.feats.astype(jnp.float32))
  protos = sums / jnp.maximum(count, 1)[:, None].astype(jnp.float32)
  return protos, count > 0


def fill_fraction(bank: MemoryBank) -> jax.Array:
  """f32[C]: fraction of each class's K slots that hold a feature."""
  return jnp.mean(bank.filled.astype(jnp.float32), axis=1)


def mean_confidence(bank: MemoryBank) -> jax.Array:
  """f32[C]: mean confidence over each class's filled slots, 0 for an empty class."""
  total = jnp.sum(jnp.where(bank.filled, bank.conf, 0.0), axis=1)
  return total / jnp.maximum(_filled_count(bank), 1).astype(jnp.float32)
