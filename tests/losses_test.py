"""Small pieces of the objective against numpy and hand-computed values."""
import jax.numpy as jnp
import numpy as np
import pytest

from semi_jax import losses
from semi_jax.train_step import interleave_rows, monitor_class_weight, prototype_targets


def test_cross_entropy_and_soft_cross_entropy():
  logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
  labels = np.array([2, 1])
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             lse - logits[[0, 1], labels], rtol=1e-6)
  onehot = np.eye(3)[labels]
  np.testing.assert_allclose(losses.soft_cross_entropy(jnp.asarray(onehot), jnp.asarray(logits)),
                             lse - logits[[0, 1], labels], rtol=1e-6)
  w = np.array([1.0, 0.0])
  np.testing.assert_allclose(losses.weighted_mean_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w)),
                             (lse[0] - 3.0) / 2, rtol=1e-6)  # masked rows still count in the mean


def test_logit_adjustment():
  prior = np.array([0.5, 0.25, 0.25])
  np.testing.assert_allclose(losses.logit_adjustment(jnp.asarray(prior), 2.0),
                             [2 * np.log(0.5), 2 * np.log(0.25), 2 * np.log(0.25)], rtol=1e-6)
  # an absent class stays finite thanks to the 1e-12 inside the log
  assert np.isfinite(np.asarray(losses.logit_adjustment(jnp.asarray([1.0, 0.0]), 2.0))).all()


def test_monitor_class_weight_kinds():
  counts = jnp.asarray([6.0, 3.0, 1.0, 0.0])
  freq = np.array([0.6, 0.3, 0.1, 0.0])
  np.testing.assert_allclose(monitor_class_weight(counts, 0, 0.99, "frequency"), freq, rtol=1e-6)
  # epoch 1, df 0.5: power = 1 - 0.5**2 = 0.75
  np.testing.assert_allclose(monitor_class_weight(counts, 1, 0.5, "decayed_frequency"),
                             [0.6 ** 0.75, 0.3 ** 0.75, 0.1 ** 0.75, 0.0], rtol=1e-5, atol=1e-7)
  inv = np.array([10 / 6, 10 / 3, 10.0, 0.0])
  inv = inv / inv.sum()
  np.testing.assert_allclose(monitor_class_weight(counts, 1, 0.5, "decayed_inverse")[:3], inv[:3] ** 0.75,
                             rtol=1e-5)
  np.testing.assert_allclose(monitor_class_weight(counts, 3, 0.9, "uniform"), np.ones(4))
  with pytest.raises(ValueError, match="plce.class_weight"):
    monitor_class_weight(counts, 0, 0.9, "nope")


def test_prototype_targets():
  feats = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
  protos = np.array([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]], np.float32)
  has = np.array([True, True, False])
  got = np.asarray(prototype_targets(jnp.asarray(feats), jnp.asarray(protos), jnp.asarray(has), 1.0))
  # row 0: distances (0, 5) -> softmax(0, -5); class 2 has no prototype
  e = np.exp(-5.0)
  np.testing.assert_allclose(got[0], [1 / (1 + e), e / (1 + e), 0.0], rtol=1e-5)
  np.testing.assert_allclose(got[1], [e / (1 + e), 1 / (1 + e), 0.0], rtol=1e-5)
  empty = np.asarray(prototype_targets(jnp.asarray(feats), jnp.zeros((3, 2)), jnp.zeros(3, bool), 1.0))
  np.testing.assert_allclose(empty, np.full((2, 3), 1 / 3), rtol=1e-6)


def test_interleave_rows_matches_reference_formula():
  x = np.arange(8 * 2).reshape(8, 2)
  size = 4  # reference: reshape([-1, size] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])
  expected = x.reshape(-1, size, 2).transpose(1, 0, 2).reshape(-1, 2)
  np.testing.assert_array_equal(np.asarray(interleave_rows(jnp.asarray(x), size)), expected)
