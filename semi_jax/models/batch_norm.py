"""BatchNorm with a hand-written backward pass and per-channel sums that can run as matrix products.

A drop-in for `flax.linen.BatchNorm` as WideResNet uses it (same variables: params `scale`/`bias`, batch_stats
`mean`/`var`; same statistics: E[x^2] - E[x]^2 in float32, the biased variance in the running average).

Why not flax's: on XLA:CPU a reduction over (N, H, W) with the channels kept is slow. XLA splits it into a
`reduce-window` tree that runs at a fraction of memory bandwidth; in the WRN-28-2 train step the BatchNorm
reductions of the forward and the backward took over a third of the step. The same sums as matrix products
(`ones @ X`, and the diagonal of `X^T Y` for the sums of products) run 3-5x faster there, reading X once. On GPU
and TPU reductions are fast and the diagonal trick would all-reduce C x C instead of C numbers across devices, so
`reduction='auto'` uses matrix products on CPU only. The backward pass is written out (`jax.custom_vjp`) so that
it needs exactly two channel sums, sum(g) and sum(g * x), instead of the ones autodiff derives.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from semi_jax import sharding
from semi_jax.models import cpu_paths

REDUCTIONS = ("auto", "matmul", "reduce")
_HIGHEST = lax.Precision.HIGHEST  # full float32 products on TPU too (its default would round to bfloat16)


def _resolve(reduction: str) -> str:
  return cpu_paths.resolve("BatchNorm reduction", reduction, REDUCTIONS, on_cpu="matmul", elsewhere="reduce")


def _channel_sum(a, reduction: str):
  """Sum over the rows of a [M, C] array."""
  if reduction == "matmul":
    out_sharding = sharding.explicit_replicated(a)
    ones = jnp.ones((1, a.shape[0]), a.dtype, device=out_sharding)
    return lax.dot_general(ones, a, (((1,), (0,)), ((), ())), precision=_HIGHEST, out_sharding=out_sharding)[0]
  return jnp.sum(a, axis=0)


def _channel_sum_of_products(a, b, reduction: str):
  """sum_m a[m, c] * b[m, c] for [M, C] arrays."""
  if reduction == "matmul":
    # The diagonal of a^T b: C times the FLOPs of the elementwise product, but a single read of a and b by a
    # matrix-multiply kernel, which on CPU beats materialising a * b and reducing it.
    return jnp.diagonal(lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                                        out_sharding=sharding.explicit_replicated(a)))
  return jnp.sum(a * b, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, reduction: str):
  """Normalises x [..., C] with the statistics of its own batch.

  Returns `(y, mean, var)`, all float32; mean and var (biased) feed the running averages. `reduction` is
  'matmul' or 'reduce' (see the module docstring); both give the same values up to float32 rounding.
  """
  return _forward(x, scale, bias, epsilon, reduction)[0]


def _forward(x, scale, bias, epsilon, reduction):
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  m = x2.shape[0]
  mean = _channel_sum(x2, reduction) / m
  # Rounding can make E[x^2] - E[x]^2 slightly negative (as in flax, clip it).
  var = jnp.maximum(_channel_sum_of_products(x2, x2, reduction) / m - mean * mean, 0.0)
  inv = lax.rsqrt(var + epsilon)
  gain = scale * inv
  y = (x.astype(jnp.float32) - mean) * gain + bias
  return (y, mean, var), (x, scale, mean, inv)


def _backward(epsilon, reduction, residuals, cotangents):
  del epsilon
  x, scale, mean, inv = residuals
  g_y, g_mean, g_var = cotangents
  c = x.shape[-1]
  x2 = x.reshape(-1, c).astype(jnp.float32)
  g2 = g_y.reshape(-1, c).astype(jnp.float32)
  m = x2.shape[0]
  g_bias = _channel_sum(g2, reduction)
  # sum(g * x_hat) with x_hat = (x - mean) * inv, from sum(g * x) so that x_hat is never materialised.
  g_scale = (_channel_sum_of_products(g2, x2, reduction) - mean * g_bias) * inv
  gain = scale * inv
  centred = x.astype(jnp.float32) - mean
  # d/dx of scale * x_hat + bias through the batch mean and variance, plus the (normally zero) cotangents of
  # the returned mean and var.
  g_x = (gain * g_y.astype(jnp.float32) - gain * g_bias / m
         + centred * ((2.0 / m) * g_var - gain * inv * g_scale / m) + g_mean / m)
  return g_x.astype(x.dtype), g_scale, g_bias


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last; float32 statistics and parameters, output in `dtype`."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  reduction: str = "auto"

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      inv = lax.rsqrt(ra_var.value + self.epsilon)
      gain = scale * inv
      y = (x.astype(jnp.float32) - ra_mean.value) * gain + bias
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, _resolve(self.reduction))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * lax.stop_gradient(mean)
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * lax.stop_gradient(var)
    return y.astype(self.dtype)
