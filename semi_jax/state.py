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

from semi_jax import semi_state


@flax.struct.dataclass
class Guard:
  """A run's divergence guard, part of its checkpointed state (`train_step.guard`).

  A step whose loss or gradient norm is NaN or Inf is never committed. Without train.skip_nonfinite_steps the run
  then stops as diverged; with it the step is skipped (counted, the step number still advances) unless more than
  train.max_nonfinite_share of the run's last train.nonfinite_window steps were skipped, which stops it as
  diverged too. A diverged run's state no longer changes (within a stacked program the other runs go on).
  """
  first_bad_step: jnp.ndarray  # int32: the first step (1-based) with a non-finite loss or gradient, -1: none yet
  terms: dict  # f32 loss terms of that step
  skipped: jnp.ndarray  # int32: steps skipped so far
  recent: jnp.ndarray  # bool[window]: whether step s was skipped, at s % window, over the last `window` steps
  diverged_step: jnp.ndarray  # int32: the step (1-based) at which the run stopped as diverged, -1 while it trains

  @classmethod
  def create(cls, loss_keys=(), window: int = 1) -> "Guard":
    return cls(first_bad_step=jnp.array(-1, jnp.int32), terms={k: jnp.array(0.0, jnp.float32) for k in loss_keys},
               skipped=jnp.array(0, jnp.int32), recent=jnp.zeros((window,), jnp.bool_),
               diverged_step=jnp.array(-1, jnp.int32))


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  semi: semi_state.SemiState
  guard: Guard | None = None  # None only in a checkpoint written before the guard was part of the state


def _decay_mask(params):
  """Weight decay on convolution and dense kernels only, not on biases or BatchNorm (as the reference)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(config, hp: dict) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled weight decay, as torch.optim.SGD(weight_decay=...). The values come
  from the run's `hp` (`hyperparams.of_config`), Nesterov from the config."""
  lr, lr_factor = hp["optim.lr"], hp["optim.lr_schedule"]
  return optax.chain(
      optax.add_decayed_weights(hp["optim.weight_decay"], mask=_decay_mask),
      optax.sgd(lambda step: lr * lr_factor(step), momentum=hp["optim.momentum"], nesterov=config.optim.nesterov))


def create_train_state(model, tx, rng, image_size: int, num_classes: int, bank_size: int,
                       bank_dtype: str = "float32", loss_keys=(), guard_window: int = 1) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(params),
      # A real copy: donating the state must not see one buffer twice.
      ema_params=jax.tree.map(jnp.copy, params),
      semi=semi_state.init(num_classes, model.feature_dim, bank_size, bank_dtype),
      guard=Guard.create(loss_keys, guard_window))
