"""The loss terms of semi_jax/losses.py against numpy and hand-computed values."""
import jax.numpy as jnp
import numpy as np

from semi_jax import losses


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
