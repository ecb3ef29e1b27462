"""Tests of semi_jax.miner against numpy re-implementations and hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from semi_jax import miner


def np_entropy(probs, eps=1e-8):
  q = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
  return -(q * np.log(q)).sum(1) / np.log(q.shape[1])


def np_rank(entropy, valid=None):
  """Stable descending ranking: position of each example in argsort(-entropy), invalid ones last."""
  entropy = np.asarray(entropy)
  valid = np.ones(len(entropy), bool) if valid is None else np.asarray(valid)
  order = np.lexsort((np.arange(len(entropy)), -entropy, ~valid))  # last key is the primary one
  rank = np.empty(len(entropy), np.int32)
  rank[order] = np.arange(len(entropy))
  return rank


def random_probs(rng, n, c):
  logits = rng.normal(size=(n, c)) * rng.uniform(0.1, 5.0, size=(n, 1))
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def test_entropy_matches_numpy_and_extremes():
  rng = np.random.default_rng(0)
  probs = np.array(random_probs(rng, 64, 10))
  probs[0] = 1.0 / 10  # uniform
  probs[1] = np.eye(10)[3]  # one-hot
  got = np.asarray(jax.jit(miner.normalized_entropy)(jnp.asarray(probs)))
  assert got.shape == (64,) and got.dtype == np.float32
  np.testing.assert_allclose(got, np_entropy(probs), atol=2e-6)
  np.testing.assert_allclose(got[0], 1.0, atol=1e-6)
  assert 0.0 <= got[1] < 1e-5
  assert np.all((got >= 0) & (got <= 1 + 1e-6))


def test_entropy_rejects_bad_shape():
  with pytest.raises(ValueError, match=r"\[N, C\]"):
    miner.normalized_entropy(jnp.ones((4,)))


def test_ohem_weights_hand_values():
  entropy = jnp.asarray([1.0, 0.0, 0.5])
  np.testing.assert_allclose(miner.ohem_weights(entropy, 0.75), [1.0, 0.25, 0.625], atol=1e-7)
  # A traced scale (from a schedule) works as well.
  got = jax.jit(miner.ohem_weights)(entropy, jnp.float32(0.5))
  np.testing.assert_allclose(got, [1.0, 0.5, 0.75], atol=1e-7)


def test_ohem_weights_from_probabilities():
  probs = jnp.asarray([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
  got = miner.ohem_weights(miner.normalized_entropy(probs), 0.75)
  np.testing.assert_allclose(got, [1.0, 0.25], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_with_ties_matches_stable_argsort(seed):
  rng = np.random.default_rng(seed)
  entropy = rng.integers(0, 5, size=40).astype(np.float32) / 4  # many ties
  got = np.asarray(jax.jit(miner.entropy_rank)(jnp.asarray(entropy)))
  np.testing.assert_array_equal(got, np_rank(entropy))
  assert got.dtype == np.int32
  assert sorted(got.tolist()) == list(range(40))


def test_rank_hand_case():
  # Hardest first; the two 0.5 entries keep index order.
  np.testing.assert_array_equal(miner.entropy_rank(jnp.asarray([0.5, 0.9, 0.1, 0.5])), [1, 0, 3, 2])


def test_rank_with_valid_puts_invalid_last():
  rng = np.random.default_rng(3)
  entropy = rng.integers(0, 4, size=24).astype(np.float32)
  valid = rng.uniform(size=24) < 0.6
  got = np.asarray(miner.entropy_rank(jnp.asarray(entropy), jnp.asarray(valid)))
  np.testing.assert_array_equal(got, np_rank(entropy, valid))
  assert got[valid].max() == valid.sum() - 1


@pytest.mark.parametrize("n,fraction", [(10, 0.7), (10, 0.25), (7, 0.5), (16, 0.0), (16, 1.0), (9, 1 / 3)])
def test_rank_weights_counts(n, fraction):
  rng = np.random.default_rng(n)
  entropy = rng.uniform(size=n).astype(np.float32)
  weights = np.asarray(miner.rank_weights(jnp.asarray(entropy), fraction, 0.25))
  num_hard = math.ceil(round(fraction * n, 9))
  assert (weights == 1.0).sum() == num_hard
  assert (weights == 0.25).sum() == n - num_hard
  # The weight-1 examples are exactly the highest-entropy ones.
  np.testing.assert_array_equal(weights == 1.0, np_rank(entropy) < num_hard)


def test_rank_weights_with_valid_counts_valid_only():
  entropy = jnp.asarray([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
  valid = jnp.asarray([False, True, True, False, True, True])
  weights = miner.rank_weights(entropy, 0.5, 0.1, valid)
  # 4 valid examples -> 2 hard: the two highest-entropy valid ones (indices 1 and 2).
  np.testing.assert_allclose(weights, [0.1, 1.0, 1.0, 0.1, 0.1, 0.1])


def test_hard_fraction_must_be_static_and_in_range():
  entropy = jnp.asarray([0.1, 0.2])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    miner.rank_weights(entropy, 1.5, 0.25)
  with pytest.raises(ValueError, match="Python float"):
    jax.jit(miner.rank_weights)(entropy, 0.5, 0.25)


def test_mine_entropy_mode():
  rng = np.random.default_rng(4)
  probs = random_probs(rng, 20, 5)
  out = jax.jit(lambda p, s: miner.mine(p, mode="entropy", scale=s, hard_fraction=0.5))(probs, jnp.float32(0.75))
  ent = np_entropy(probs)
  np.testing.assert_allclose(out.entropy, ent, atol=2e-6)
  np.testing.assert_allclose(out.weights, ent * 0.75 + 0.25, atol=2e-6)
  np.testing.assert_array_equal(out.rank, np_rank(np.asarray(out.entropy)))
  np.testing.assert_array_equal(out.is_hard, np.asarray(out.rank) < 10)
  assert out.weights.dtype == jnp.float32 and out.is_hard.dtype == jnp.bool_


def test_mine_rank_mode():
  rng = np.random.default_rng(5)
  probs = random_probs(rng, 20, 5)
  out = miner.mine(probs, mode="rank", scale=0.75, hard_fraction=0.3)
  hard = np_rank(np.asarray(out.entropy)) < 6
  np.testing.assert_array_equal(out.is_hard, hard)
  np.testing.assert_allclose(out.weights, np.where(hard, 1.0, 0.25))


def test_mine_unknown_mode():
  with pytest.raises(ValueError, match="entropy.*rank"):
    miner.mine(jnp.full((4, 3), 1 / 3), mode="topk", scale=0.75, hard_fraction=0.5)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_ranking_same_on_one_and_eight_devices(axis_type):
  assert jax.device_count() == 8
  rng = np.random.default_rng(6)
  n = 64
  probs = np.array(random_probs(rng, n, 10))
  probs[::5] = probs[0]  # exact ties across shards
  valid = rng.uniform(size=n) < 0.7
  fn = jax.jit(lambda p, v: miner.mine(p, mode="rank", scale=0.75, hard_fraction=0.25, valid=v))
  single = fn(jax.device_put(probs, jax.devices()[0]), jax.device_put(valid, jax.devices()[0]))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharded = NamedSharding(mesh, P("data"))
  multi = fn(jax.device_put(probs, sharded), jax.device_put(valid, sharded))
  for a, b in zip(single, multi):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rank_single = jax.jit(miner.entropy_rank)(jax.device_put(single.entropy, jax.devices()[0]))
  rank_multi = jax.jit(miner.entropy_rank)(jax.device_put(single.entropy, sharded))
  np.testing.assert_array_equal(rank_single, rank_multi)
  np.testing.assert_array_equal(rank_multi, np_rank(np.asarray(single.entropy)))
