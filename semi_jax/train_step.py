"""The jitted train and eval steps: pure functions, no Python side effects, no host transfers.

A train step reads top to bottom: forward (one pass over concat(x, u_w, u_s, u_s')), objective
(`objective.compute_objective`), update (SGD and the EMA of the weights), SeMi state (`semi_state.update`:
memory bank, class-frequency monitor, consistency centre). `guarded_step` wraps it as the training loop runs
it: a divergence guard and the metrics accumulated on the device, so the loop reads nothing back between log
steps.

Train batches (see input_pipeline): `images` uint8[B + 3U, H, W, 3] holds the four groups x, u_w, u_s, u_s' laid
out device block by device block (`split_views`), so that every device finds its own rows of each group in its
own shard; y int32[B]; u_label int32[U] (true label for diagnostics only, -1 if unknown; never in the loss);
u_index int32[U]. With the augmentation on the device (`StepContext.augment`), `images` uint8[B + U] holds the
source images x, u in the same block layout and `positions` int32[B + U] their stream positions; the step makes
the views from them first (`device_augment.train_images`). Eval batches: image, label, mask.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from semi_jax import device_augment, losses, objective, schedules, semi_state, sharding
from semi_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Static inputs of the step, baked into the compiled function."""
  model: Any
  tx: optax.GradientTransformation
  config: Any
  class_prior: np.ndarray  # labeled class frequencies py
  mean: np.ndarray
  std: np.ndarray
  # The mesh the step runs on. Its data-axis size is the number of device blocks of the `images` layout, and the
  # memory-bank candidates are gathered to every device before the push, so the replicated bank is updated
  # locally instead of being all-reduced as a [C, K, D] table. None: one block, no gather (a single device).
  mesh: Any = None
  # device_augment.Settings where the step makes the views from source images (data.augment_on); None: the batch
  # holds the views, made by tf.data.
  augment: Any = None

  @property
  def data_blocks(self) -> int:
    return 1 if self.mesh is None else int(self.mesh.shape[sharding.DATA_AXIS])

  def replicate(self, x):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec()))


def normalize(images, mean, std):
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def split_views(rows, batch_size: int, unlabeled_size: int, blocks: int) -> objective.Views:
  """The rows of a train batch, or of a model output over it, as the four groups in global batch order.

  Block d of the `blocks` equal blocks holds x[d], u_w[d], u_s[d], u_s'[d], the d-th slices of each group
  (`input_pipeline.pack_views` lays them out). With one block per device of the data axis every device holds its
  own slices: the reshapes and slices here move no data between devices.
  """
  sizes = [batch_size // blocks] + [unlabeled_size // blocks] * 3
  tail = rows.shape[1:]
  parts = jnp.split(rows.reshape((blocks, sum(sizes)) + tail), np.cumsum(sizes)[:-1], axis=1)
  return objective.Views(*(part.reshape((-1,) + tail) for part in parts))


def compute_gradients(state: TrainState, batch, rng, ctx: StepContext):
  """Forward and objective: (gradients, new BatchNorm statistics, metrics, objective.Aux)."""
  b, u = batch["y"].shape[0], batch["u_label"].shape[0]
  images = batch["images"]
  if ctx.augment is not None:
    images = device_augment.train_images(images, batch["positions"], rng, ctx.augment, b, u, ctx.data_blocks)
  images = normalize(images, jnp.asarray(ctx.mean, jnp.float32), jnp.asarray(ctx.std, jnp.float32))
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    (logits, logits_b, feats), updates = ctx.model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"],
        rngs={"dropout": dropout_rng})
    views = lambda out: split_views(out, b, u, ctx.data_blocks)
    total, metrics, aux = objective.compute_objective(
        views(logits), views(logits_b), views(feats), batch["y"], batch["u_label"], state.semi, state.step,
        ctx.config, ctx.class_prior)
    return total, (updates["batch_stats"], metrics, aux)

  grads, (batch_stats, metrics, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
  return grads, batch_stats, metrics, aux


def train_step(state: TrainState, batch, rng, ctx: StepContext):
  """One optimisation step: (new state, metrics of the step)."""
  cfg = ctx.config
  grads, batch_stats, metrics, aux = compute_gradients(state, batch, rng, ctx)

  updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - cfg.optim.ema_decay)

  semi, semi_metrics = semi_state.update(state.semi, aux, state.step, cfg, gather=ctx.replicate)

  lr = cfg.optim.lr * schedules.of_run(cfg.optim.lr_schedule, cfg)(state.step)
  metrics.update(semi_metrics, grad_norm=optax.global_norm(grads), lr=lr)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                            ema_params=ema_params, semi=semi)
  return new_state, metrics


def init_carry(metrics_cls, loss_keys):
  """What `guarded_step` carries from step to step: the divergence guard and the accumulated metrics."""
  return {"guard": {"first_bad_step": jnp.array(-1, jnp.int32), "skipped": jnp.array(0, jnp.int32),
                    "terms": {k: jnp.array(0.0, jnp.float32) for k in loss_keys}},
          "metrics": metrics_cls.empty()}


def guarded_step(state: TrainState, carry, batch, rng, ctx: StepContext, metrics_cls, skip_nonfinite: bool):
  """`train_step` as the training loop runs it: (new state, new carry), nothing else to read back.

  The guard records the first step whose loss or gradient norm is NaN/Inf (its number and loss terms) and counts
  them; with `skip_nonfinite` such a step keeps the old state (the step count still advances: the next batch and
  the schedules follow the step count, not the updates) and leaves the metric averages.
  """
  new_state, out = train_step(state, batch, rng, ctx)
  guard = carry["guard"]
  finite = jnp.isfinite(out["loss"]) & jnp.isfinite(out["grad_norm"])
  first = (guard["first_bad_step"] < 0) & ~finite
  guard = {"first_bad_step": jnp.where(first, state.step + 1, guard["first_bad_step"]),
           "skipped": guard["skipped"] + (~finite).astype(jnp.int32),
           "terms": {k: jnp.where(first, out[k], v) for k, v in guard["terms"].items()}}
  if skip_nonfinite:
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = kept.replace(step=new_state.step)
    # clu wants a leading axis on masked values.
    step_metrics = metrics_cls.single_from_model_output(
        **{k: jnp.where(finite, v, 0.0)[None] for k, v in out.items()}, mask=finite[None])
  else:
    step_metrics = metrics_cls.single_from_model_output(**out)
  return new_state, {"guard": guard, "metrics": carry["metrics"].merge(step_metrics)}


def eval_step(params, batch_stats, batch, ctx: StepContext):
  """Confusion matrices [C, C] (rows: true class) of both heads over the valid (mask) rows of a batch."""
  x = normalize(batch["image"], jnp.asarray(ctx.mean, jnp.float32), jnp.asarray(ctx.std, jnp.float32))
  logits, logits_b, _ = ctx.model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  c = logits.shape[-1]
  valid = batch["mask"].astype(jnp.float32)
  label = jnp.where(batch["mask"], batch["label"], 0)

  def confusion(lg):
    return jnp.zeros((c, c), jnp.float32).at[label, jnp.argmax(lg, -1)].add(valid)

  loss = jnp.sum(losses.cross_entropy(logits_b, label) * valid)
  return {"confusion": confusion(logits), "confusion_b": confusion(logits_b), "loss_b_sum": loss,
          "count": jnp.sum(valid)}
