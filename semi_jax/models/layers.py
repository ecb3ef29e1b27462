"""The layers the models share: convolution and BatchNorm constructors (flax's, or semi_jax.cpu's drop-ins with
`cpu_fast_paths`), the reference initialisations, and the two linear heads of ACR/SeMi."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from semi_jax import run_axis
from semi_jax.cpu import batch_norm as cpu_batch_norm
from semi_jax.cpu import conv as cpu_conv

# torch's kaiming_normal_(mode='fan_out') with the ReLU gain sqrt(2); xavier_normal_ for the linear heads.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


@dataclasses.dataclass(frozen=True)
class PerRun:
  """Asks the layers of a model trained in a stacked program to batch their convolutions over the run axis one
  run at a time (`semi_jax.run_axis.per_run`) instead of as grouped convolutions. `mesh`: the program's (run,
  data) mesh (None: one device)."""
  mesh: Any = None


def _per_run_conv_general_dilated(mesh, lhs, rhs, window_strides, padding, **static):
  """`lax.conv_general_dilated` as flax's Conv calls it, batched over runs one run at a time."""
  conv = lambda x, w: lax.conv_general_dilated(x, w, window_strides, padding, **static)
  return run_axis.per_run(conv, mesh)(lhs, rhs)


def make_layers(cpu_fast_paths: bool, dtype, bn_momentum: float, per_run: PerRun | None = None):
  """(conv, batch_norm) constructors: conv(features, kernel, stride, name) with 'same'-style padding k // 2 and no
  bias; batch_norm(train, name) with epsilon 1e-5 (torch's) and running-average decay `bn_momentum`. With
  `per_run`, the convolutions batch over the run axis of a stacked program one run at a time."""
  if cpu_fast_paths:
    conv = lambda ch, k, s, name: cpu_conv.Conv(ch, (k, k), (s, s), padding=k // 2, kernel_init=conv_init,
                                                dtype=dtype, per_run=per_run, name=name)
    norm = lambda train, name: cpu_batch_norm.BatchNorm(use_running_average=not train, momentum=bn_momentum,
                                                        epsilon=1e-5, dtype=dtype, name=name)
  else:
    lax_conv = None if per_run is None else functools.partial(_per_run_conv_general_dilated, per_run.mesh)
    conv = lambda ch, k, s, name: nn.Conv(ch, (k, k), (s, s), padding=k // 2, use_bias=False,
                                          kernel_init=conv_init, dtype=dtype, conv_general_dilated=lax_conv, name=name)
    norm = lambda train, name: nn.BatchNorm(use_running_average=not train, momentum=bn_momentum, epsilon=1e-5,
                                            dtype=dtype, name=name)
  return conv, norm


def pool_and_heads(x, num_classes: int):
  """Global average pool in float32 -> features f; `(fc(f), fc1(f), f)`: standard head, balanced head, features.
  Called inside the model's compact `__call__`, so the heads are its submodules `fc` and `fc1`."""
  features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  dense = lambda name: nn.Dense(num_classes, kernel_init=dense_init, bias_init=nn.initializers.zeros,
                                dtype=jnp.float32, name=name)
  return dense("fc")(features), dense("fc1")(features), features
