"""ResNet with the two linear heads of ACR/SeMi: ResNet-50 is the backbone of the ImageNet-127 runs.

Matches the reference's CIFAR-style ResNet (kuangliu's layout, as ACR and SeMi use it): a 3x3 stride-1 stem
convolution with 64 channels, no max-pool, four stages of `blocks` residual blocks with 64, 128, 256 and 512
channels (x 4 at the output of a bottleneck) and strides 1, 2, 2, 2, ReLU, post-activation blocks (conv-BN-ReLU,
the last BN before the addition, ReLU after it), a 1x1 convolution + BN shortcut wherever the stride or the
width changes, the bottleneck's stride on its 3x3 convolution, global average pool -> features f
(D = 512 x 4 = 2048 for ResNet-50). Convolutions kaiming-normal (fan_out, ReLU gain), BN weight 1 / bias 0,
linear heads xavier-normal with zero bias. BatchNorm has torch's default momentum 0.1, a running-average decay
of 0.9 (`bn_momentum`).

`blocks` (3, 4, 6, 3) with bottlenecks is ResNet-50, (2, 2, 2, 2) with basic blocks ResNet-18; `base_width`
scales every stage (64 in the reference; smaller for tests). The reference also builds a rotation head `rot`
that SeMi never trains or reads; it is not built here (the weight importer skips it).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from semi_jax.models.layers import make_layers, pool_and_heads

BLOCKS = ("bottleneck", "basic")
EXPANSION = {"bottleneck": 4, "basic": 1}
STAGE_STRIDES = (1, 2, 2, 2)


class ResidualBlock(nn.Module):
  """Bottleneck (1x1 -> 3x3 with the stride -> 1x1 to 4 x width) or basic (3x3 with the stride -> 3x3) block."""
  width: int
  stride: int
  block: str
  bn_momentum: float
  dtype: Any
  cpu_fast_paths: bool
  per_run: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = make_layers(self.cpu_fast_paths, self.dtype, self.bn_momentum, self.per_run)
    out_channels = self.width * EXPANSION[self.block]
    if self.block == "bottleneck":
      layers = ((self.width, 1, 1), (self.width, 3, self.stride), (out_channels, 1, 1))
    else:
      layers = ((self.width, 3, self.stride), (out_channels, 3, 1))
    out = x
    for i, (channels, kernel, stride) in enumerate(layers, start=1):
      out = norm(train, f"bn{i}")(conv(channels, kernel, stride, f"conv{i}")(out))
      if i < len(layers):
        out = nn.relu(out)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_channels:
      shortcut = norm(train, "shortcut_bn")(conv(out_channels, 1, self.stride, "shortcut_conv")(x))
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """Returns `(logits, logits_balanced, features)`: standard head `fc`, balanced head `fc1`, pooled features."""
  num_classes: int
  blocks: tuple[int, ...] = (3, 4, 6, 3)
  block: str = "bottleneck"
  base_width: int = 64
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  cpu_fast_paths: bool = False  # semi_jax.cpu's layers instead of flax's (for runs on CPUs)
  per_run: Any = None  # layers.PerRun: convolutions batched over a stacked program's runs one run at a time

  @property
  def feature_dim(self) -> int:
    return 8 * self.base_width * EXPANSION[self.block]

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.block not in BLOCKS:
      raise ValueError(f"ResNet block must be one of {BLOCKS}, got {self.block!r}.")
    if len(self.blocks) != len(STAGE_STRIDES) or min(self.blocks) < 1:
      raise ValueError(f"ResNet blocks must be {len(STAGE_STRIDES)} counts >= 1 (one per stage), got {self.blocks}.")
    conv, norm = make_layers(self.cpu_fast_paths, self.dtype, self.bn_momentum, self.per_run)
    x = x.astype(self.dtype)
    x = nn.relu(norm(train, "bn1")(conv(self.base_width, 3, 1, "conv1")(x)))
    for stage, (count, stride) in enumerate(zip(self.blocks, STAGE_STRIDES)):
      for i in range(count):
        x = ResidualBlock(self.base_width * 2 ** stage, stride if i == 0 else 1, self.block, self.bn_momentum,
                          self.dtype, self.cpu_fast_paths, self.per_run, name=f"layer{stage + 1}_{i}")(x, train)
    return pool_and_heads(x, self.num_classes)
