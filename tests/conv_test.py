"""Conv: outputs and both gradients against float64 numpy, parity with flax.linen.Conv, sharded batches, and
the XLA:CPU program it compiles to with the run's compiler options (oneDNN forward and input gradient, Eigen
kernel gradient)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from semi_jax.cpu import compiler_options
from semi_jax.cpu.conv import (Conv, _chunk_count, _input_grad_by_phase, _kernel_grad_by_phase,
                               conv_reversed_weight_grad)

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


def relative_error(got, want):
  """||got - want|| / ||want||, in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


# The parity shapes take each branch of the custom backward pass: a stride-2 3x3 convolution (input gradient by
# phase), the strided 1x1 shortcut (kernel gradient by phase too), and a batch in 3 groups of 16 images.
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], SHAPES[5]], ids=["3x3/2", "1x1/2", "48_images"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_parameters_outputs_and_gradients_as_flax_conv(dtype, shape):
  x, _, k, stride, pad = case(shape, seed=2)
  x = jnp.asarray(x, jnp.float32)
  init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  features = shape[4]
  ours = Conv(features, (k, k), (stride, stride), padding=pad, kernel_init=init, dtype=dtype)
  flax_conv = lambda dtype: nn.Conv(features, (k, k), (stride, stride), padding=pad, use_bias=False,
                                    kernel_init=init, dtype=dtype)
  variables = ours.init(jax.random.key(0), x)
  flax_variables = flax_conv(dtype).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_variables)
  np.testing.assert_array_equal(variables["params"]["kernel"], flax_variables["params"]["kernel"])
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x).astype(jnp.float32)))
  grads = lambda module: jax.jit(jax.grad(loss(module), argnums=(0, 1)))(variables, x)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  y = ours.apply(variables, x)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(flax_conv(dtype).apply(variables, x), np.float32), rtol=tol, atol=tol)
  got, want = grads(ours), grads(flax_conv(dtype))
  assert got[0]["params"]["kernel"].dtype == jnp.float32
  if dtype == jnp.float32:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), got, want)
    return
  # The two gradient codes round differently in bfloat16: hold both to flax's float32 gradients instead, within
  # 1 % in norm (bfloat16's unit roundoff is 0.4 %; both measured 0.2-0.6 %).
  reference = grads(flax_conv(jnp.float32))
  for name, ref, ours_g, flax_g in zip(("kernel", "input"), *map(jax.tree.leaves, (reference, got, want))):
    assert relative_error(ours_g, ref) < 1e-2, f"{name} gradient: {relative_error(ours_g, ref):.4f}"
    assert relative_error(flax_g, ref) < 1e-2, f"flax's {name} gradient: {relative_error(flax_g, ref):.4f}"


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


@pytest.fixture
def fully_optimised():
  """XLA's full optimisation, as users run it (tests/conftest.py turns most of it off)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


ONEDNN = "__onednn$convolution"


# XLA cannot serialise programs with oneDNN calls, so the suite's persistent compilation cache warns and skips them.
@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[5:6], ids=["3x3/1", "3x3/2", "3x3/2_odd", "48_images"])
def test_with_the_compiler_options_onednn_runs_forward_and_input_gradient_and_eigen_the_kernel_gradient(
    shape, fully_optimised):
  """The point of the module, in the configuration users run (full optimisation, the run's compiler options):
  oneDNN computes the forward and the input-gradient convolutions (strided ones too), XLA's own (Eigen)
  convolution the kernel gradient, and all three still match float64 numpy. Without the options, no oneDNN."""
  options = compiler_options.for_run(True, xla_flags="")  # not the suite's XLA_FLAGS, which turn oneDNN off
  assert options.get("xla_cpu_experimental_onednn_custom_call") is True, options
  x, w, k, stride, pad = case(shape)
  conv = lambda x, w: conv_reversed_weight_grad(x, w, (stride, stride), ((pad, pad), (pad, pad)))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x32, w32 = f32(x), f32(w)
  g = np.random.default_rng(1).normal(size=jax.eval_shape(conv, x32, w32).shape)
  backward = lambda x, w, g: jax.vjp(conv, x, w)[1](g)
  programs = {"forward": (conv, (x32, w32)),
              "input gradient": (lambda x, w, g: backward(x, w, g)[0], (x32, w32, f32(g))),
              "kernel gradient": (lambda x, w, g: backward(x, w, g)[1], (x32, w32, f32(g)))}
  compiled = {name: jax.jit(f, compiler_options=options).lower(*args).compile()
              for name, (f, args) in programs.items()}
  want_x, want_w = numpy_grads(x, w, g, stride, pad)
  np.testing.assert_allclose(compiled["forward"](x32, w32), numpy_conv(x, w, stride, pad), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(compiled["input gradient"](*programs["input gradient"][1]), want_x, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(compiled["kernel gradient"](*programs["kernel gradient"][1]), want_w, rtol=1e-5,
                             atol=1e-4)
  counts = {name: program.as_text().count(ONEDNN) for name, program in compiled.items()}
  # How many calls (one per input phase at stride 2, ...) is XLA's choice; that the kernel gradient has none is
  # what the custom backward pass is for.
  assert counts["forward"] >= 1 and counts["input gradient"] >= 1, counts
  assert counts["kernel gradient"] == 0, counts
  plain = {name: jax.jit(f).lower(*args).compile().as_text().count(ONEDNN) for name, (f, args) in programs.items()}
  assert plain == {name: 0 for name in programs}, plain


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


def test_wrong_rank_is_a_clear_error():
  with pytest.raises(ValueError, match="NHWC images of rank 4"):
    Conv(4, (3, 3)).init(jax.random.key(0), jnp.ones((4, 4, 3)))
