"""CPU fast path: a 2-D convolution (NHWC input, HWIO kernel, no bias) whose gradients XLA:CPU runs fast.

A drop-in for `flax.linen.Conv(features, kernel_size, strides, padding, use_bias=False)` as WideResNet uses it:
the same `kernel` parameter, the same outputs and gradients (up to float rounding).

Why not flax's: with the CPU fast paths on, semi_jax compiles with XLA:CPU's oneDNN convolutions
(`semi_jax/cpu/compiler_options.py`), which run the forward and the input gradient of this model's 3x3 convolutions
1.5-2.5x faster than XLA's Eigen kernels. XLA expresses the kernel gradient as one more forward convolution, whose
window is the whole image (e.g. 32x32 over a batch of 256); oneDNN runs that shape 2x slower than Eigen. XLA hands a
convolution to oneDNN unless its kernel operand is a `reverse`, so the backward pass writes the kernel gradient as a
correlation with the twice-flipped output gradient: the same numbers, which XLA fuses into the layout copy it makes
anyway, and which keeps that one convolution on Eigen. It is also split over groups of 16 images (see
`_kernel_grad`), at the price of more convolutions to compile (the WRN-28-2 train step compiles in about 14 s
instead of 8 s). The input gradient of a strided convolution is written as one stride-1 convolution per phase of the
input grid (`_input_grad_by_phase`), which oneDNN runs, instead of XLA's convolution over a zero-dilated gradient,
which stays on Eigen; when the kernel is no larger than the stride (the strided 1x1 shortcut), the kernel gradient
is split the same way (`_kernel_grad_by_phase`). GPU and TPU use `flax.linen.Conv` and JAX's own transpose rules
(see `semi_jax.cpu`).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from semi_jax import run_axis, sharding

IMAGES_PER_CHUNK = 16  # images per kernel-gradient convolution (see `_kernel_grad`)
_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_reversed_weight_grad(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
  """`lax.conv_general_dilated(x, kernel, strides, padding)` for NHWC x and HWIO kernel; the gradient with
  respect to `kernel` is computed as a correlation with a reversed operand (see the module docstring)."""
  return _conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _chunk_count(batch: int) -> int:
  """Number of image groups for the kernel gradient: the most that keeps >= IMAGES_PER_CHUNK images each."""
  for count in range(max(batch // IMAGES_PER_CHUNK, 1), 0, -1):
    if batch % count == 0:
      return count
  return 1


def _kernel_grad(x, g, kernel_shape, strides, padding):
  """dK[a, b, c, d] = sum_{n,i,j} x_pad[n, s*i + a, s*j + b, c] * g[n, i, j, d].

  A convolution over x with the batch and channel roles swapped (x's channels are the batch, its images the
  contraction) and g as the window, dilated by the stride. The high padding makes the output exactly the kernel's
  spatial size (negative values crop rows the strided forward never read).

  The images are split into groups of about IMAGES_PER_CHUNK and the groups' gradients summed: on a 2-core
  CPU, Eigen ran one convolution over a batch of 256 (a contraction over 256 x 32 x 32 values per output) 1.5-2x
  slower than 16 independent ones over 16 images each (groups of 8 or 32 were slower than 16 in the train step).
  Group j holds images j, j + k, j + 2k, ..., so that with the batch sharded over devices in contiguous blocks
  each device still reads only its own images.
  """
  kh, kw = kernel_shape[:2]
  pads = []
  for size, out_size, k, s, (low, _) in zip(x.shape[1:3], g.shape[1:3], (kh, kw), strides, padding):
    pads.append((low, k + (out_size - 1) * s - size - low))
  count = _chunk_count(x.shape[0])
  x_groups = x.reshape(x.shape[0] // count, count, *x.shape[1:])
  g_groups = g.reshape(g.shape[0] // count, count, *g.shape[1:])
  total = None
  for j in range(count):
    x_j, g_j = x_groups[:, j], g_groups[:, j]
    # g flipped, laid out [Ho, Wo, N, D], and flipped back as the convolution's kernel operand: the transpose
    # between the two reverses stops XLA from cancelling them before it picks a convolution library.
    flipped = lax.rev(g_j, (1, 2)).transpose(1, 2, 0, 3)
    # x: [N, H, W, C] read as (feature=N, spatial, batch=C); the output [kh, kw, C, D] is the HWIO layout. Under
    # Explicit mesh axes the contraction over a sharded batch needs its (replicated) result spelled out.
    part = lax.conv_general_dilated(x_j, lax.rev(flipped, (0, 1)), window_strides=(1, 1), padding=pads,
                                    rhs_dilation=strides, dimension_numbers=("CHWN", "HWIO", "HWNC"),
                                    out_sharding=sharding.explicit_replicated(x_j))
    total = part if total is None else total + part
  return total


def _kernel_grad_by_phase(x, g, kernel_shape, strides, padding):
  """`_kernel_grad` of a strided convolution as stride-1 kernel gradients, one per phase of the padded input.

  The strided kernel gradient is a convolution whose window is g dilated by the stride: Eigen steps over the
  dilation's holes. Tap a of a kernel row only ever meets padded input rows a, a + s, a + 2s, ..., so the taps
  a = r, r + s, ... all come from the input phase x_pad[r::s]: a stride-1 kernel gradient of that phase against g
  gives them all, with no holes (a 1x1 kernel at stride 2 needs just x[:, ::2, ::2]).
  """
  kh, kw = kernel_shape[:2]
  (sh, sw), (ho, wo) = strides, g.shape[1:3]
  # x_pad[n, s * i + a] for every output row i and tap a (negative high padding crops rows no tap reaches).
  x_pad = lax.pad(x, jnp.zeros((), x.dtype),
                  [(0, 0, 0), (padding[0][0], (ho - 1) * sh + kh - x.shape[1] - padding[0][0], 0),
                   (padding[1][0], (wo - 1) * sw + kw - x.shape[2] - padding[1][0], 0), (0, 0, 0)])
  grad = jnp.zeros(tuple(kernel_shape), g.dtype)
  for r in range(min(sh, kh)):
    for c in range(min(sw, kw)):
      taps_h, taps_w = len(range(r, kh, sh)), len(range(c, kw, sw))
      phase = x_pad[:, r::sh, c::sw][:, :ho + taps_h - 1, :wo + taps_w - 1]
      part = _kernel_grad(phase, g, (taps_h, taps_w), (1, 1), ((0, 0), (0, 0)))
      grad = grad.at[r::sh, c::sw].set(part.astype(g.dtype))
  return grad


def _phase_taps(size: int, stride: int, low: int, phase: int) -> tuple[list[int], int]:
  """Kernel taps (in correlation order) that reach input positions `stride * m + phase`, and the offset into g
  of the first: x[stride * m + phase] receives g[m + offset + j] * kernel[taps[j]] for every j (1-D)."""
  taps = sorted((a for a in range(size) if (phase + low - a) % stride == 0), reverse=True)
  return taps, ((phase + low - taps[0]) // stride if taps else 0)


def _input_grad_by_phase(g, kernel, x_shape, strides, padding):
  """Input gradient of a strided convolution as stride-1 convolutions, one per phase of the input grid.

  XLA writes it as one convolution over g dilated by the stride (zeros between its rows and columns). XLA:CPU
  does not give that to oneDNN, and Eigen multiplies the zeros too. Split by the input position's remainder
  modulo the stride instead: each phase is a plain convolution of g with the kernel taps that reach it (for a
  3x3 kernel at stride 2: 1x1, 1x2, 2x1 and 2x2 sub-kernels, 9 taps in all, no multiplication by a dilation
  zero), which oneDNN runs; padding with interior zeros puts each phase back in place, fused into their sum.
  """
  _, height, width, _ = x_shape
  total = None
  for row in range(strides[0]):
    row_taps, row_offset = _phase_taps(kernel.shape[0], strides[0], padding[0][0], row)
    rows = -(-(height - row) // strides[0])  # input rows of this phase
    for col in range(strides[1]):
      col_taps, col_offset = _phase_taps(kernel.shape[1], strides[1], padding[1][0], col)
      cols = -(-(width - col) // strides[1])
      if not (row_taps and col_taps and rows > 0 and cols > 0):
        continue  # no tap reaches this phase: its gradient is zero
      # [taps_h, taps_w, out channels, in channels]: gathered tap by tap, not as a reverse of the kernel (XLA
      # keeps a convolution whose kernel is a reverse off oneDNN).
      sub_kernel = jnp.stack([jnp.stack([kernel[a, b] for b in col_taps]) for a in row_taps]).transpose(0, 1, 3, 2)
      pads = [(-offset, count - 1 + offset + len(taps) - size)
              for offset, count, taps, size in ((row_offset, rows, row_taps, g.shape[1]),
                                                (col_offset, cols, col_taps, g.shape[2]))]
      phase = _conv(g, sub_kernel, (1, 1), pads)
      placed = lax.pad(phase, jnp.zeros((), phase.dtype),
                       [(0, 0, 0), (row, height - row - (rows - 1) * strides[0] - 1, strides[0] - 1),
                        (col, width - col - (cols - 1) * strides[1] - 1, strides[1] - 1), (0, 0, 0)])
      total = placed if total is None else total + placed
  return jnp.zeros(x_shape, g.dtype) if total is None else total


def _backward(strides, padding, residuals, g):
  x, kernel = residuals
  if strides == (1, 1):
    _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, padding), x)
    (g_x,) = input_vjp(g)
  else:
    g_x = _input_grad_by_phase(g, kernel, x.shape, strides, padding)
  if strides != (1, 1) and all(k <= s for k, s in zip(kernel.shape[:2], strides)):
    # e.g. WideResNet's strided 1x1 shortcut: 2x faster split. With more taps than the stride (3x3 at stride 2)
    # the phases' smaller convolutions ran no faster (16x16) or slower (32x32) than the dilated one.
    g_kernel = _kernel_grad_by_phase(x, g, kernel.shape, strides, padding)
  else:
    g_kernel = _kernel_grad(x, g, kernel.shape, strides, padding)
  return g_x, g_kernel.astype(kernel.dtype)


conv_reversed_weight_grad.defvjp(_forward, _backward)


class Conv(nn.Module):
  """Bias-free 2-D convolution over NHWC inputs with an HWIO `kernel` parameter kept in float32."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: int = 0
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  per_run: Any = None  # semi_jax.models.layers.PerRun: batch over the run axis one run at a time

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"Conv expects NHWC images of rank 4, got shape {x.shape}.")
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = tuple(int(s) for s in self.strides)
    padding = ((self.padding, self.padding),) * 2
    conv = lambda x, kernel: conv_reversed_weight_grad(x, kernel, strides, padding)
    if self.per_run is not None:
      conv = run_axis.per_run(conv, self.per_run.mesh)
    return conv(x, kernel)
