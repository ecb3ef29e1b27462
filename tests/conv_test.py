"""Conv: outputs and both gradients against float64 numpy, parity with flax.linen.Conv, sharded batches, and
the XLA:CPU program it compiles to (oneDNN forward and input gradient, Eigen kernel gradient)."""
import ast
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from semi_jax.models.conv import (Conv, _chunk_count, _input_grad_by_phase, _kernel_grad_by_phase,
                                  conv_reversed_weight_grad)

REPO = pathlib.Path(__file__).resolve().parents[1]

# (batch, height, width, in channels, out channels, kernel, stride): odd and even sizes, the 1x1 shortcut,
# and the strided convolutions that start WideResNet's second and third stages.
SHAPES = [(3, 7, 7, 3, 4, 3, 1), (2, 8, 6, 3, 5, 3, 2), (2, 9, 9, 4, 6, 3, 2), (3, 8, 8, 4, 6, 1, 2),
          (2, 5, 5, 2, 3, 1, 1),
          # batches the kernel gradient splits into groups of images: 3 groups of 16, and 2 of 17
          (48, 5, 5, 3, 4, 3, 1), (34, 6, 6, 2, 3, 3, 2)]


def numpy_conv(x, w, stride, pad):
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (x.shape[1] + 2 * pad - k) // stride + 1, (x.shape[2] + 2 * pad - k) // stride + 1
  windows = lambda a, b: xp[:, a:a + stride * ho:stride, b:b + stride * wo:stride]
  return sum(np.einsum("nijc,cd->nijd", windows(a, b), w[a, b]) for a in range(k) for b in range(k))


def numpy_grads(x, w, g, stride, pad):
  """Gradients of sum(conv(x, w) * g), written out from the definition."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = g.shape[1:3]
  g_xp = np.zeros_like(xp)
  g_w = np.zeros_like(w)
  for a in range(k):
    for b in range(k):
      rows, cols = slice(a, a + stride * ho, stride), slice(b, b + stride * wo, stride)
      g_w[a, b] = np.einsum("nijc,nijd->cd", xp[:, rows, cols], g)
      g_xp[:, rows, cols] += np.einsum("nijd,cd->nijc", g, w[a, b])
  return g_xp[:, pad:pad + x.shape[1], pad:pad + x.shape[2]], g_w


def case(shape, seed=0):
  n, h, wd, cin, cout, k, stride = shape
  rng = np.random.default_rng(seed)
  x, w = rng.normal(size=(n, h, wd, cin)), rng.normal(size=(k, k, cin, cout))
  return x, w, k, stride, k // 2


@pytest.mark.parametrize("shape", SHAPES)
def test_output_and_gradients_match_float64(shape):
  x, w, k, stride, pad = case(shape)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  conv = lambda x, w: conv_reversed_weight_grad(x, w, (stride, stride), ((pad, pad), (pad, pad)))
  y, vjp = jax.vjp(conv, f32(x), f32(w))
  np.testing.assert_allclose(y, numpy_conv(x, w, stride, pad), rtol=1e-5, atol=1e-5)
  g = np.random.default_rng(1).normal(size=y.shape)
  g_x, g_w = jax.jit(vjp)(f32(g))
  want_x, want_w = numpy_grads(x, w, g, stride, pad)
  np.testing.assert_allclose(g_x, want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_w, want_w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weight_grad", ["reversed", "autodiff"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_parameters_outputs_and_gradients_as_flax_conv(weight_grad, dtype):
  x, _, k, stride, pad = case(SHAPES[2], seed=2)
  x = jnp.asarray(x, jnp.float32)
  init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  ours = Conv(6, (k, k), (stride, stride), padding=pad, kernel_init=init, dtype=dtype, weight_grad=weight_grad)
  flax_conv = nn.Conv(6, (k, k), (stride, stride), padding=pad, use_bias=False, kernel_init=init, dtype=dtype)
  variables = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(0), x))
  np.testing.assert_array_equal(variables["params"]["kernel"],
                                flax_conv.init(jax.random.key(0), x)["params"]["kernel"])
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x).astype(jnp.float32)))
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  y = ours.apply(variables, x)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(flax_conv.apply(variables, x), np.float32),
                             rtol=tol, atol=tol)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  want = jax.jit(jax.grad(loss(flax_conv), argnums=(0, 1)))(variables, x)
  assert got[0]["params"]["kernel"].dtype == jnp.float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                       rtol=tol, atol=tol * 10), got, want)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_same_gradients_with_the_batch_sharded_over_eight_devices(axis_type):
  x, w, k, stride, pad = case((64, 6, 6, 3, 4, 3, 2), seed=3)  # four groups of 16 images in the kernel gradient
  f = jax.jit(jax.value_and_grad(
      lambda x, w: jnp.sum(jnp.tanh(conv_reversed_weight_grad(x, w, (stride, stride), ((pad, pad),) * 2))),
      argnums=(0, 1)))
  x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(w, NamedSharding(mesh, P()))
  single = jax.device_put((x, w), jax.devices()[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               f(sharded, replicated), f(*single))


# Runs in a fresh interpreter with semi_jax's default XLA flags (the suite's conftest turns oneDNN off).
_DEFAULT_FLAGS_CHECK = """
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
import conv_test as t
from semi_jax.models.conv import conv_reversed_weight_grad

def hlo(f, *args):
  return jax.jit(f).lower(*args).compile().as_text()

onednn = "__onednn$convolution"
counts = []
for shape in t.SHAPES[:3] + t.SHAPES[5:6]:  # the last in 3 groups of 16 images
  x, w, k, stride, pad = t.case(shape)
  conv = lambda x, w: conv_reversed_weight_grad(x, w, (stride, stride), ((pad, pad), (pad, pad)))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, vjp = jax.vjp(conv, f32(x), f32(w))
  g = np.random.default_rng(1).normal(size=y.shape)
  g_x, g_w = jax.jit(vjp)(f32(g))
  want_x, want_w = t.numpy_grads(x, w, g, stride, pad)
  np.testing.assert_allclose(y, t.numpy_conv(x, w, stride, pad), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_w, want_w, rtol=1e-5, atol=1e-4)
  backward = lambda x, w, g: jax.vjp(conv, x, w)[1](g)
  counts.append((hlo(conv, f32(x), f32(w)).count(onednn),
                 hlo(lambda x, w, g: backward(x, w, g)[0], f32(x), f32(w), f32(g)).count(onednn),
                 hlo(lambda x, w, g: backward(x, w, g)[1], f32(x), f32(w), f32(g)).count(onednn)))
print("COUNTS", counts)
"""


def test_with_the_default_flags_onednn_runs_forward_and_input_gradient_and_eigen_the_kernel_gradient():
  """The point of the module, in the configuration users run (full optimisation, semi_jax's XLA flags): oneDNN
  computes the forward and the input-gradient convolutions (strided ones too), XLA's own (Eigen) convolution the kernel
  gradient, and all three still match float64 numpy."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  result = subprocess.run([sys.executable, "-c", _DEFAULT_FLAGS_CHECK, str(pathlib.Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  counts = [line for line in result.stdout.splitlines() if line.startswith("COUNTS")]
  assert len(counts) == 1, result.stdout
  counts = ast.literal_eval(counts[0].removeprefix("COUNTS "))  # [(forward, input grad, kernel grad)] per shape
  assert [forward for forward, _, _ in counts] == [1, 1, 1, 1]
  # One convolution at stride 1; at stride 2 one per phase of the input grid (a 3x3 kernel reaches all four).
  assert [input_grad for _, input_grad, _ in counts] == [1, 4, 4, 1]
  assert [kernel_grad for _, _, kernel_grad in counts] == [0, 0, 0, 0]


# (height, width, kernel, stride, padding): odd and even sizes, strides 2 and 3, a kernel smaller than the stride
# (phases no tap reaches), padding larger than the stride, and input rows the strided forward never reads.
@pytest.mark.parametrize("height,width,kernel,stride,pad", [
    (8, 8, 3, 2, 1), (9, 7, 3, 2, 1), (8, 6, 1, 2, 0), (10, 11, 3, 3, 1), (7, 7, 1, 3, 0), (9, 9, 5, 2, 2),
    (12, 12, 3, 2, 0), (6, 9, 2, 3, 3), (3, 3, 3, 2, 1)])
def test_strided_input_gradient_by_phase_matches_autodiff(height, width, kernel, stride, pad):
  rng = np.random.default_rng(height * 100 + width)
  x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
  strides, padding = (stride, stride), ((pad, pad), (pad, pad))
  conv = lambda x: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y, vjp = jax.vjp(conv, x)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  np.testing.assert_allclose(_input_grad_by_phase(g, w, x.shape, strides, padding), vjp(g)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height,width,kernel,stride,pad", [
    (8, 8, 1, 2, 0), (9, 7, 1, 2, 0), (7, 7, 1, 3, 0), (8, 8, 3, 2, 1), (10, 11, 3, 3, 1), (9, 9, 5, 2, 2),
    (6, 9, 2, 3, 3)])
def test_strided_kernel_gradient_by_phase_matches_autodiff(height, width, kernel, stride, pad):
  rng = np.random.default_rng(height * 100 + width + kernel)
  x = jnp.asarray(rng.normal(size=(34, height, width, 3)), jnp.float32)  # 2 groups of 17 images
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
  strides, padding = (stride, stride), ((pad, pad), (pad, pad))
  conv = lambda w: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y, vjp = jax.vjp(conv, w)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  np.testing.assert_allclose(_kernel_grad_by_phase(x, g, w.shape, strides, padding), vjp(g)[0], rtol=1e-5,
                             atol=1e-4)


def test_kernel_gradient_groups_have_at_least_sixteen_images():
  assert [_chunk_count(n) for n in (1, 15, 16, 31, 32, 34, 48, 64, 250, 256)] == [1, 1, 1, 1, 2, 2, 3, 4, 10, 16]


def test_unknown_weight_grad_and_wrong_rank_are_clear_errors():
  with pytest.raises(ValueError, match="weight_grad must be one of"):
    Conv(4, (3, 3), weight_grad="fast").init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="NHWC images of rank 4"):
    Conv(4, (3, 3)).init(jax.random.key(0), jnp.ones((4, 4, 3)))
