"""Tests of semi_jax.memory_bank against a plain-Python reference and hand-made cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from semi_jax import memory_bank as mb


# --- plain-Python reference of the rule -----------------------------------------------------------------------

def ref_push(bank, feats, conf, labels, valid):
  """Candidates inserted one at a time, in batch order, into per-class lists sorted by confidence.

  A candidate replaces the last (lowest, and among equal lowest the newest) entry of its class only if
  its confidence is strictly greater; the list is then re-sorted with Python's stable sort, so an entry
  never overtakes an older one of equal confidence.
  """
  num_classes, size = bank["conf"].shape
  rows = [[(bank["conf"][c, k], bank["feats"][c, k], bank["filled"][c, k], bank["fresh"][c, k])
           for k in range(size)] for c in range(num_classes)]
  for i in range(len(conf)):
    c = int(labels[i])
    if not valid[i] or not 0 <= c < num_classes:
      continue
    if conf[i] > rows[c][-1][0]:
      rows[c][-1] = (np.float32(conf[i]), feats[i], True, True)
      rows[c].sort(key=lambda entry: -entry[0])
  return unpack(rows)


def ref_decay(bank, beta):
  num_classes, size = bank["conf"].shape
  rows = []
  for c in range(num_classes):
    row = []
    for k in range(size):
      conf = bank["conf"][c, k]
      if bank["filled"][c, k] and not bank["fresh"][c, k]:
        conf = np.float32(conf) * np.float32(beta)
      row.append((conf, bank["feats"][c, k], bank["filled"][c, k], False))
    row.sort(key=lambda entry: -entry[0])
    rows.append(row)
  return unpack(rows)


def unpack(rows):
  return {
      "conf": np.array([[e[0] for e in row] for row in rows], np.float32),
      "feats": np.array([[e[1] for e in row] for row in rows], np.float32),
      "filled": np.array([[e[2] for e in row] for row in rows], bool),
      "fresh": np.array([[e[3] for e in row] for row in rows], bool),
  }


def as_dict(bank):
  """The bank's contents in rank order (how the reference keeps them), after checking the slot invariant."""
  slot = np.asarray(bank.slot)
  np.testing.assert_array_equal(np.sort(slot, axis=1), np.broadcast_to(np.arange(bank.size), slot.shape))
  out = {k: np.asarray(getattr(bank, k)) for k in ("conf", "filled", "fresh")}
  out["feats"] = np.asarray(mb.ranked_feats(bank))
  return out


def assert_bank_equal(got, want):
  got = as_dict(got) if isinstance(got, mb.MemoryBank) else got
  for key in ("conf", "feats", "filled", "fresh"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def make_bank(conf, feats=None, fresh=None):
  conf = np.asarray(conf, np.float32)
  num_classes, size = conf.shape
  filled = conf > 0
  if feats is None:  # each stored feature encodes its own confidence, so misalignment is visible
    feats = np.repeat(conf[..., None], 2, axis=-1) + np.arange(num_classes)[:, None, None] * 10
  feats = np.where(filled[..., None], feats, 0.0).astype(np.float32)
  fresh = np.zeros_like(filled) if fresh is None else np.asarray(fresh, bool)
  return mb.MemoryBank.from_ranked(feats, conf, filled, fresh & filled)


def candidates(conf, labels, valid=None, dim=2):
  conf = np.asarray(conf, np.float32)
  feats = (100 + np.arange(len(conf)))[:, None].repeat(dim, 1)  # feature = 100 + batch index
  valid = np.ones(len(conf), bool) if valid is None else np.asarray(valid, bool)
  return jnp.asarray(feats, jnp.float32), jnp.asarray(conf), jnp.asarray(labels, jnp.int32), jnp.asarray(valid)


push = jax.jit(mb.push)
decay = jax.jit(mb.decay)


# --- against the reference ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_push_and_decay_match_python_reference(seed):
  rng = np.random.default_rng(seed)
  num_classes, size, n, dim = int(rng.integers(3, 6)), 4, 20, 3
  bank = mb.init_bank(num_classes, size, dim)
  want = as_dict(bank)
  for step in range(6):
    # Confidences on a coarse grid (with some zeros) so that ties are frequent.
    conf = rng.integers(0, 6, size=n).astype(np.float32) / 5
    labels = rng.integers(0, num_classes, size=n)
    valid = rng.uniform(size=n) < 0.8
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    bank = push(bank, jnp.asarray(feats), jnp.asarray(conf), jnp.asarray(labels), jnp.asarray(valid))
    want = ref_push(want, feats, conf, labels, valid)
    assert_bank_equal(bank, want)
    if step % 2 == 1:
      bank = decay(bank, 0.5)
      want = ref_decay(want, 0.5)
      assert_bank_equal(bank, want)
  assert np.all(np.diff(np.asarray(bank.conf), axis=1) <= 0), "rows must stay sorted"


def test_push_matches_reference_with_more_candidates_than_slots():
  rng = np.random.default_rng(10)
  bank = make_bank(rng.uniform(size=(3, 8)).round(1) * (rng.uniform(size=(3, 8)) < 0.7))
  bank = decay(bank, 1.0)  # sorts the rows
  n = 50
  conf = rng.integers(1, 11, size=n).astype(np.float32) / 10
  # Mostly class 1 (more candidates than slots), some labels out of range.
  labels = np.where(rng.uniform(size=n) < 0.8, 1, rng.integers(-1, 4, size=n))
  feats = rng.normal(size=(n, 2)).astype(np.float32)
  valid = np.ones(n, bool)
  got = push(bank, jnp.asarray(feats), jnp.asarray(conf), jnp.asarray(labels), jnp.asarray(valid))
  assert_bank_equal(got, ref_push(as_dict(bank), feats, conf, labels, valid))


# --- hand-made cases ------------------------------------------------------------------------------------------

def test_equal_to_lowest_does_not_enter_but_greater_does():
  bank = make_bank([[0.9, 0.8, 0.5], [0.7, 0.6, 0.4]])
  same = push(bank, *candidates([0.5], [0]))
  assert_bank_equal(same, as_dict(bank))
  better = push(bank, *candidates([0.6], [0]))
  np.testing.assert_allclose(better.conf[0], [0.9, 0.8, 0.6])
  # survivors keep their features, and the new feature sits with its confidence
  np.testing.assert_array_equal(mb.ranked_feats(better)[0, :2], mb.ranked_feats(bank)[0, :2])
  np.testing.assert_array_equal(mb.ranked_feats(better)[0, 2], [100, 100])
  np.testing.assert_array_equal(better.fresh[0], [False, False, True])
  assert_bank_equal({k: v[1:] for k, v in as_dict(better).items()}, {k: v[1:] for k, v in as_dict(bank).items()})


def test_tie_with_stored_entry_goes_after_it_and_candidates_keep_batch_order():
  bank = make_bank([[0.9, 0.5, 0.3, 0.2]])
  got = push(bank, *candidates([0.5, 0.6, 0.5], [0, 0, 0]))
  np.testing.assert_allclose(got.conf[0], [0.9, 0.6, 0.5, 0.5])
  # slot 2 is the stored 0.5 (older wins the tie), slot 3 candidate 0 (lower index than candidate 2).
  np.testing.assert_array_equal(mb.ranked_feats(got)[0, :, 0], np.float32([0.9, 101, 0.5, 100]))
  np.testing.assert_array_equal(got.fresh[0], [False, True, False, True])


def test_many_candidates_of_one_class_all_enter():
  bank = mb.init_bank(3, 4, 2)
  got = push(bank, *candidates([0.3, 0.9, 0.6, 0.8], [2, 2, 2, 2]))
  np.testing.assert_allclose(got.conf[2], [0.9, 0.8, 0.6, 0.3])
  np.testing.assert_array_equal(mb.ranked_feats(got)[2, :, 0], [101, 103, 102, 100])
  assert np.all(got.filled[2]) and np.all(got.fresh[2])
  # Six candidates for four slots: the four best enter, all in one call.
  got = push(bank, *candidates([0.3, 0.9, 0.6, 0.8, 0.1, 0.7], [1] * 6))
  np.testing.assert_allclose(got.conf[1], [0.9, 0.8, 0.7, 0.6])
  np.testing.assert_array_equal(mb.ranked_feats(got)[1, :, 0], [101, 103, 105, 102])


def test_other_classes_untouched():
  bank = make_bank([[0.9, 0.8, 0.0], [0.7, 0.0, 0.0], [0.6, 0.5, 0.4]], fresh=[[1, 0, 0], [0, 0, 0], [0, 1, 0]])
  got = push(bank, *candidates([0.95, 0.2], [1, 1]))
  before, after = as_dict(bank), as_dict(got)
  for key in before:
    np.testing.assert_array_equal(after[key][[0, 2]], before[key][[0, 2]], err_msg=key)
  np.testing.assert_allclose(after["conf"][1], [0.95, 0.7, 0.2])
  np.testing.assert_array_equal(after["filled"][1], [True, True, True])
  np.testing.assert_array_equal(after["fresh"][1], [True, False, True])


def test_invalid_and_out_of_range_candidates_ignored():
  bank = make_bank([[0.9, 0.0], [0.0, 0.0]])
  got = push(bank, *candidates([0.99, 0.99, 0.99, 0.0, float("nan")], [1, -1, 2, 1, 1],
                               valid=[False, True, True, True, True]))
  assert_bank_equal(got, as_dict(bank))


def test_decay_only_stale_entries_and_resets_fresh():
  bank = make_bank([[0.9, 0.8, 0.7, 0.0]], fresh=[[False, True, False, False]])
  got = decay(bank, 0.5)
  # 0.9 -> 0.45 and 0.7 -> 0.35 (stale); 0.8 is fresh and keeps its value, then rows are re-sorted.
  np.testing.assert_allclose(got.conf[0], [0.8, 0.45, 0.35, 0.0])
  np.testing.assert_array_equal(mb.ranked_feats(got)[0, :, 0], np.float32([0.8, 0.9, 0.7, 0.0]))
  np.testing.assert_array_equal(got.filled[0], [True, True, True, False])
  assert not np.any(got.fresh)
  # beta may be traced (it comes from a schedule).
  traced = decay(bank, jnp.float32(0.5))
  assert_bank_equal(traced, as_dict(got))


def test_decay_rejects_beta_out_of_range():
  with pytest.raises(ValueError, match="beta"):
    mb.decay(mb.init_bank(2, 2, 2), 1.5)


def test_prototypes_ignore_empty_slots():
  # Empty slots hold junk here: only the filled flags may decide what is averaged.
  feats = np.full((3, 4, 2), 7.0, np.float32)
  feats[0, :2] = [[1, 2], [3, 4]]
  feats[1, :1] = [[5, -5]]
  conf = np.float32([[0.9, 0.8, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0], [0.0] * 4])
  bank = mb.MemoryBank.from_ranked(feats, conf, conf > 0, np.zeros((3, 4), bool))
  protos, has_proto = jax.jit(mb.prototypes)(bank)
  np.testing.assert_allclose(protos, [[2, 3], [5, -5], [0, 0]])
  np.testing.assert_array_equal(has_proto, [True, True, False])
  np.testing.assert_allclose(mb.fill_fraction(bank), [0.5, 0.25, 0.0])
  np.testing.assert_allclose(mb.mean_confidence(bank), [0.85, 0.7, 0.0], rtol=1e-6)


def test_init_bank_shapes_and_errors():
  bank = mb.init_bank(5, 4, 3, dtype=jnp.bfloat16)
  assert (bank.num_classes, bank.size, bank.dim) == (5, 4, 3)
  assert bank.feats.dtype == jnp.bfloat16 and bank.conf.dtype == jnp.float32
  assert bank.filled.dtype == jnp.bool_ and not np.any(bank.filled) and not np.any(bank.fresh)
  pushed = push(bank, jnp.ones((2, 3), jnp.float32), jnp.asarray([0.5, 0.7]), jnp.asarray([4, 4]),
                jnp.asarray([True, True]))
  assert pushed.feats.dtype == jnp.bfloat16 and pushed.conf.dtype == jnp.float32
  np.testing.assert_allclose(pushed.conf[4, :2], [0.7, 0.5])
  with pytest.raises(ValueError, match="size"):
    mb.init_bank(5, 0, 3)


def test_push_rejects_mismatched_shapes():
  bank = mb.init_bank(3, 4, 2)
  feats, conf, labels, valid = candidates([0.5, 0.6], [0, 1])
  with pytest.raises(ValueError, match="feats"):
    mb.push(bank, jnp.zeros((2, 5)), conf, labels, valid)
  with pytest.raises(ValueError, match="labels"):
    mb.push(bank, feats, conf, labels[:1], valid)


def test_no_recompilation_and_stable_dtypes_under_jit():
  rng = np.random.default_rng(0)
  step = jax.jit(lambda bank, f, c, l, v, beta: mb.decay(mb.push(bank, f, c, l, v), beta))
  bank = mb.init_bank(4, 4, 3)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), bank)
  for i in range(4):
    conf = rng.uniform(size=8).astype(np.float32)
    bank = step(bank, jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), jnp.asarray(conf),
                jnp.asarray(rng.integers(0, 4, size=8)), jnp.asarray(conf > 0.3), jnp.float32(0.9 + i / 100))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), bank) == shapes
  assert step._cache_size() == 1


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_push_same_on_one_and_eight_devices(axis_type):
  assert jax.device_count() == 8
  rng = np.random.default_rng(1)
  num_classes, size, n, dim = 5, 4, 64, 3
  bank = make_bank(np.sort(rng.integers(0, 6, size=(num_classes, size)) / 5)[:, ::-1],
                   feats=rng.normal(size=(num_classes, size, dim)))
  conf = (rng.integers(1, 6, size=n) / 5).astype(np.float32)
  args = (rng.normal(size=(n, dim)).astype(np.float32), conf, rng.integers(0, num_classes, size=n),
          rng.uniform(size=n) < 0.7)
  one = jax.devices()[0]
  single = push(jax.device_put(bank, one), *(jax.device_put(a, one) for a in args))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  multi = push(jax.device_put(bank, NamedSharding(mesh, P())),
               *(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args))
  assert_bank_equal(multi, as_dict(single))
  assert_bank_equal(single, ref_push(as_dict(bank), *args))
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(multi))


def test_push_and_decay_move_no_stored_feature():
  """Features stay in their storage slots: a push writes only the rows of entering candidates, a decay none."""
  rng = np.random.default_rng(3)
  num_classes, size, n, dim = 4, 6, 20, 3
  bank = mb.init_bank(num_classes, size, dim)
  for _ in range(3):
    before = np.asarray(bank.feats)
    offered = rng.normal(size=(n, dim)).astype(np.float32)
    conf = rng.uniform(0.1, 1.0, n).astype(np.float32)
    labels = rng.integers(0, num_classes, n)
    bank = push(bank, jnp.asarray(offered), jnp.asarray(conf), jnp.asarray(labels), jnp.ones(n, bool))
    changed = np.any(np.asarray(bank.feats) != before, axis=-1)  # [C, K] storage slots written
    # Exactly as many slots were written as entries entered (fresh), each with one of the offered features.
    assert changed.sum() == np.asarray(bank.fresh).sum() > 0
    for c, s in zip(*np.nonzero(changed)):
      assert any(np.array_equal(np.asarray(bank.feats)[c, s], f) for f in offered)
    decayed = mb.decay(bank, 0.5)
    np.testing.assert_array_equal(decayed.feats, bank.feats)
    bank = decayed


def test_a_bfloat16_bank_stores_rounded_features_and_ranks_like_a_float32_one():
  """bank.dtype=bfloat16 halves the [C, K, D] table; confidences stay float32, so every ranking, slot and flag is
  the float32 bank's, each stored feature is the float32 one rounded to bfloat16, and the prototypes (computed in
  float32) are within bfloat16 rounding (relative 2**-8) of the float32 bank's."""
  rng = np.random.default_rng(5)
  num_classes, size, dim = 6, 8, 64
  banks = {dtype: mb.init_bank(num_classes, size, dim, dtype) for dtype in (jnp.float32, jnp.bfloat16)}
  for step in range(5):
    feats = rng.standard_normal((40, dim)).astype(np.float32)
    conf = rng.uniform(0.5, 1.0, 40).astype(np.float32)
    labels, valid = rng.integers(0, num_classes, 40), rng.uniform(size=40) < 0.8
    banks = {d: push(b, feats, conf, labels, valid) for d, b in banks.items()}
    if step == 2:
      banks = {d: mb.decay(b, 0.9) for d, b in banks.items()}
  full, half = banks[jnp.float32], banks[jnp.bfloat16]
  assert half.feats.dtype == jnp.bfloat16 and half.conf.dtype == jnp.float32
  assert half.feats.nbytes * 2 == full.feats.nbytes
  for name in ("conf", "filled", "fresh", "slot"):
    np.testing.assert_array_equal(getattr(half, name), getattr(full, name), err_msg=name)
  np.testing.assert_array_equal(np.asarray(half.feats), np.asarray(full.feats.astype(jnp.bfloat16)))
  (p_full, has_full), (p_half, has_half) = mb.prototypes(full), mb.prototypes(half)
  assert p_half.dtype == jnp.float32 and np.array_equal(has_full, has_half) and has_full.all()
  np.testing.assert_allclose(p_half, p_full, atol=2.0 ** -8 * float(np.abs(full.feats).max()))
