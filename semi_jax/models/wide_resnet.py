"""WideResNet-d-w with the two linear heads of ACR/SeMi.

Matches the reference architecture (FixMatch's WRN): pre-activation basic blocks, LeakyReLU(0.1), BatchNorm
with running-average decay 0.999 (PyTorch momentum 0.001), convolutions kaiming-normal (fan_out, gain sqrt 2),
linear layers xavier-normal with zero bias. NHWC layout, the native one for XLA.

Layers: `flax.linen.Conv` and `flax.linen.BatchNorm` with autodiff, as GPUs and TPUs run them; with
`cpu_fast_paths` the drop-in replacements of `semi_jax.cpu` (same variables, same numbers up to float rounding,
hand-written backward passes that XLA:CPU runs fast).

The reference computes `relu(bn1(x))` and discards it in the first block of a stage that changes width
without `activate_before_residual`; it changes no output, so that BatchNorm is not built here (a weight
importer skips it).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from semi_jax.models.layers import make_layers, pool_and_heads


class BasicBlock(nn.Module):
  out_channels: int
  stride: int
  activate_before_residual: bool
  dropout: float
  bn_momentum: float
  leaky_slope: float
  dtype: Any
  cpu_fast_paths: bool
  per_run: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = make_layers(self.cpu_fast_paths, self.dtype, self.bn_momentum, self.per_run)
    bn = lambda name: norm(train, name)
    act = lambda y: nn.leaky_relu(y, self.leaky_slope)
    equal_in_out = x.shape[-1] == self.out_channels
    if equal_in_out:
      out = conv(self.out_channels, 3, self.stride, "conv1")(act(bn("bn1")(x)))
      shortcut = x
    else:
      if self.activate_before_residual:
        x = act(bn("bn1")(x))
      out = conv(self.out_channels, 3, self.stride, "conv1")(x)
      shortcut = conv(self.out_channels, 1, self.stride, "shortcut")(x)
    out = act(bn("bn2")(out))
    if self.dropout > 0:
      out = nn.Dropout(self.dropout, deterministic=not train)(out)
    out = conv(self.out_channels, 3, 1, "conv2")(out)
    return shortcut + out


class WideResNet(nn.Module):
  """Returns `(logits, logits_balanced, features)`: standard head `fc`, balanced head `fc1`, pooled features."""
  num_classes: int
  depth: int = 28
  width: int = 2
  dropout: float = 0.0
  bn_momentum: float = 0.999
  leaky_slope: float = 0.1
  dtype: Any = jnp.float32
  cpu_fast_paths: bool = False  # semi_jax.cpu's layers instead of flax's (for runs on CPUs)
  per_run: Any = None  # layers.PerRun: convolutions batched over a stacked program's runs one run at a time

  @property
  def feature_dim(self) -> int:
    return 64 * self.width

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth}.")
    n = (self.depth - 4) // 6
    channels = (16, 16 * self.width, 32 * self.width, 64 * self.width)
    conv, norm = make_layers(self.cpu_fast_paths, self.dtype, self.bn_momentum, self.per_run)
    x = x.astype(self.dtype)
    x = conv(channels[0], 3, 1, "conv1")(x)
    for stage, (out_ch, stride) in enumerate(zip(channels[1:], (1, 2, 2))):
      for i in range(n):
        x = BasicBlock(out_ch, stride if i == 0 else 1, activate_before_residual=stage == 0,
                       dropout=self.dropout, bn_momentum=self.bn_momentum, leaky_slope=self.leaky_slope,
                       dtype=self.dtype, cpu_fast_paths=self.cpu_fast_paths, per_run=self.per_run,
                       name=f"block{stage + 1}_{i}")(x, train)
    x = norm(train, "bn1")(x)
    x = nn.leaky_relu(x, self.leaky_slope)
    return pool_and_heads(x, self.num_classes)
