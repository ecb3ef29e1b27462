"""Loss terms of FixMatch / ACR / SeMi as pure functions of logits, labels and masks."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, labels):
  """Per-example CE with integer labels, computed in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def logit_adjustment(class_prior, tau):
  """tau * log(prior) (+1e-12 inside the log, as the reference), added to / subtracted from logits."""
  return jnp.log(class_prior ** tau + 1e-12)


def weighted_mean_ce(logits, labels, weights):
  """mean_i CE_i * w_i over ALL rows (masked rows count in the denominator, as FixMatch does)."""
  return jnp.mean(cross_entropy(logits, labels) * weights)


def soft_cross_entropy(target_probs, logits):
  """Per-example CE between a (stop-gradient) target distribution and logits."""
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)
