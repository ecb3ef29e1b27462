"""BatchNorm: statistics and hand-written gradients against float64 numpy, flax.linen.BatchNorm parity, and the
two-stage channel sums."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from semi_jax.cpu import batch_norm
from semi_jax.cpu.batch_norm import BatchNorm, batch_norm_train

EPS = 1e-5
# Image rows of width 16 (the channel sums add up groups of 8 pixels first), 4 (groups of 4) and 5 (no groups).
SHAPES = ((8, 5, 5, 3), (3, 2, 16, 4), (4, 3, 4, 2))


def inputs(seed=0, shape=(8, 5, 5, 3)):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  # An offset and a spread per channel, so that the mean and variance terms matter.
  x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, c) + rng.normal(size=c) * 2
  return x, rng.normal(size=c), rng.normal(size=c)


def numpy_forward(x, scale, bias):
  x2 = x.reshape(-1, x.shape[-1])
  mean, var = x2.mean(0), x2.var(0)
  return (x - mean) / np.sqrt(var + EPS) * scale + bias, mean, var


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64(shape):
  x, scale, bias = inputs(shape=shape)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, mean, var = jax.jit(batch_norm_train, static_argnums=3)(f32(x), f32(scale), f32(bias), EPS)
  want_y, want_mean, want_var = numpy_forward(x, scale, bias)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, want_var, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_float64(shape):
  x, scale, bias = inputs(1, shape)
  rng = np.random.default_rng(2)
  w, u, v = rng.normal(size=x.shape), rng.normal(size=x.shape[-1]), rng.normal(size=x.shape[-1])

  def loss(x, scale, bias):  # every output gets a cotangent, the returned mean and var included
    y, mean, var = batch_norm_train(x, scale, bias, EPS)
    return jnp.sum(y * w) + jnp.sum(mean * u) + jnp.sum(var * v)

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  g_x, g_scale, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(f32(x), f32(scale), f32(bias))

  # Hand-derived float64 gradients of the same loss.
  c = x.shape[-1]
  m = x.size // c
  x2, w2 = x.reshape(-1, c), w.reshape(-1, c)
  mean, var = x2.mean(0), x2.var(0)
  inv = 1 / np.sqrt(var + EPS)
  x_hat = (x2 - mean) * inv
  want_bias = w2.sum(0)
  want_scale = (w2 * x_hat).sum(0)
  want_x = (scale * inv * (w2 - want_bias / m - x_hat * want_scale / m) + u / m + v * 2 * (x2 - mean) / m)
  np.testing.assert_allclose(g_bias, want_bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_scale, want_scale, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_x).reshape(-1, c), want_x, rtol=1e-4, atol=1e-5)


def flax_and_ours(dtype=jnp.float32):
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS, dtype=dtype)
  ours = BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS, dtype=dtype)
  return flax_bn, ours


def test_module_matches_flax_batchnorm():
  x, scale, bias = inputs(3)
  x = jnp.asarray(x, jnp.float32)
  flax_bn, ours = flax_and_ours()
  variables = flax_bn.init(jax.random.key(0), x)
  ours_init = ours.init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours_init) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                             variables)
  variables = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
               "batch_stats": {"mean": jnp.full(3, 0.5, jnp.float32), "var": jnp.full(3, 2.0, jnp.float32)}}
  want, want_stats = flax_bn.apply(variables, x, mutable=["batch_stats"])
  got, got_stats = ours.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_stats, want_stats)
  # Eval mode uses the running statistics.
  np.testing.assert_allclose(BatchNorm(use_running_average=True, epsilon=EPS).apply(variables, x),
                             nn.BatchNorm(use_running_average=True, epsilon=EPS).apply(variables, x),
                             rtol=1e-5, atol=1e-5)

  # Gradients through the layer and a nonlinearity, w.r.t. input and parameters.
  weights = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)

  def loss(module):
    def f(params, x):
      y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.tanh(y) * weights)
    return jax.grad(f, argnums=(0, 1))(variables["params"], x)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), loss(ours), loss(flax_bn))


def test_bfloat16_output_with_float32_statistics():
  x, _, _ = inputs(5)
  _, ours = flax_and_ours(jnp.bfloat16)
  x = jnp.asarray(x, jnp.bfloat16)
  variables = ours.init(jax.random.key(0), x)
  y, stats = ours.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((variables, stats)))
  g = jax.grad(lambda x: jnp.sum(ours.apply(variables, x, mutable=["batch_stats"])[0].astype(jnp.float32)))(x)
  assert g.dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(16, 4, 4, 5), (8, 2, 8, 3)])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_same_statistics_and_gradients_with_the_batch_sharded_over_eight_devices(axis_type, shape):
  x, scale, bias = inputs(6, shape=shape)
  f = jax.jit(jax.value_and_grad(
      lambda x, s, b: jnp.sum(jnp.tanh(batch_norm_train(x, s, b, EPS)[0])), argnums=(0, 1, 2)))
  args = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharded = jax.device_put(args[0], NamedSharding(mesh, P("data")))
  single = jax.device_put(args, jax.devices()[0])
  # Sharding changes the order of the float32 additions; 1e-5 absolute on gradients of size ~1.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               f(sharded, *args[1:]), f(*single))


@pytest.mark.parametrize("shape, group", [((2, 3, 16, 4), 8), ((2, 3, 12, 4), 4), ((2, 3, 6, 4), 2),
                                          ((2, 3, 5, 4), 1), ((6, 4), 1)])
def test_pixel_group_sums_add_neighbouring_pixels_of_one_row(shape, group):
  rng = np.random.default_rng(7)
  arrays = [rng.normal(size=shape).astype(np.float32) for _ in range(2)]
  got = batch_norm._pixel_group_sums(*map(jnp.asarray, arrays))
  assert len(got) == 2
  for a, g in zip(arrays, got):
    want = a if len(shape) < 3 else a.reshape(shape[:-2] + (shape[-2] // group, group, shape[-1])).sum(-2)
    assert g.shape == want.shape
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES + ((6, 4),))
def test_channel_sums_match_numpy(shape):
  rng = np.random.default_rng(8)
  arrays = [rng.normal(size=shape).astype(np.float32) for _ in range(2)]
  got = jax.jit(batch_norm._channel_sums)(*map(jnp.asarray, arrays))
  assert len(got) == 2
  for a, g in zip(arrays, got):
    np.testing.assert_allclose(g, a.reshape(-1, shape[-1]).astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
