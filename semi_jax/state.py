"""Everything that must survive a restart, as one pytree, and how it is created.

`TrainState` holds the network (params, BatchNorm statistics, optimiser state, EMA params, step) and
`semi_state.SemiState`, the algorithm's own on-device state (memory bank, class-frequency monitor, consistency
centre). The per-step RNG is not stored: it is `fold_in(fixed_key, step)`, so resuming is exact without it.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from semi_jax import schedules, semi_state


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  semi: semi_state.SemiState


def _decay_mask(params):
  """Weight decay on convolution and dense kernels only, not on biases or BatchNorm (as the reference)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled weight decay, as torch.optim.SGD(weight_decay=...)."""
  o = config.optim
  lr_factor = schedules.of_run(o.lr_schedule, config)
  return optax.chain(
      optax.add_decayed_weights(o.weight_decay, mask=_decay_mask),
      optax.sgd(lambda step: o.lr * lr_factor(step), momentum=o.momentum, nesterov=o.nesterov))


def create_train_state(model, tx, rng, image_size: int, num_classes: int, bank_size: int,
                       bank_dtype: str = "float32") -> TrainState:
  variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(params),
      # A real copy: donating the state must not see one buffer twice.
      ema_params=jax.tree.map(jnp.copy, params),
      semi=semi_state.init(num_classes, model.feature_dim, bank_size, bank_dtype))
