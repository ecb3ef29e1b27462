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
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from semi_jax import device_augment, losses, objective, run_axis, semi_state, sharding
from semi_jax.state import TrainState, make_optimizer


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
  # The run's values of the traceable fields (`hyperparams.of_config`): numpy constants for a run alone; within a
  # stacked program the fields in which the runs differ are traced per-run values.
  hp: dict = dataclasses.field(default_factory=dict)

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


def input_images(batch, rng, ctx: StepContext):
  """The step's normalised float32 images [B + 3U, H, W, 3] (the four groups in `split_views`'s layout): the
  batch's views, or the views the step makes from the source images (`StepContext.augment`) with the key `rng`."""
  images = batch["images"]
  if ctx.augment is not None:
    b, u = batch["y"].shape[0], batch["u_label"].shape[0]
    images = device_augment.train_images(images, batch["positions"], rng, ctx.augment, b, u, ctx.data_blocks)
  return normalize(images, jnp.asarray(ctx.mean, jnp.float32), jnp.asarray(ctx.std, jnp.float32))


def loss_and_aux(params, state: TrainState, images, batch, rng, ctx: StepContext):
  """The objective of one forward pass of `params` over the step's `images` (`input_images`):
  (total loss, (new BatchNorm statistics, metrics, objective.Aux))."""
  b, u = batch["y"].shape[0], batch["u_label"].shape[0]
  (logits, logits_b, feats), updates = ctx.model.apply(
      {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.fold_in(rng, state.step)})
  views = lambda out: split_views(out, b, u, ctx.data_blocks)
  total, metrics, aux = objective.compute_objective(
      views(logits), views(logits_b), views(feats), batch["y"], batch["u_label"], state.semi, state.step,
      ctx.config, ctx.class_prior, ctx.hp)
  return total, (updates["batch_stats"], metrics, aux)


def compute_gradients(state: TrainState, batch, rng, ctx: StepContext):
  """Forward and objective: (gradients, new BatchNorm statistics, metrics, objective.Aux)."""
  grads, (batch_stats, metrics, aux) = jax.grad(loss_and_aux, has_aux=True)(
      state.params, state, input_images(batch, rng, ctx), batch, rng, ctx)
  return grads, batch_stats, metrics, aux


def apply_gradients(state: TrainState, grads, batch_stats, metrics, aux, ctx: StepContext):
  """The update of one step from its gradients: SGD, the EMA of the weights and the SeMi state. Returns
  (new state, metrics of the step)."""
  updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ctx.hp["optim.ema_decay"])

  semi, semi_metrics = semi_state.update(state.semi, aux, state.step, ctx.config, ctx.hp, gather=ctx.replicate)

  lr = ctx.hp["optim.lr"] * ctx.hp["optim.lr_schedule"](state.step)
  metrics = dict(metrics, **semi_metrics, grad_norm=optax.global_norm(grads), lr=lr)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                            ema_params=ema_params, semi=semi)
  return new_state, metrics


def train_step(state: TrainState, batch, rng, ctx: StepContext):
  """One optimisation step: (new state, metrics of the step)."""
  grads, batch_stats, metrics, aux = compute_gradients(state, batch, rng, ctx)
  return apply_gradients(state, grads, batch_stats, metrics, aux, ctx)


def init_carry(metrics_cls):
  """What the loop's step carries from step to step and reads at log steps: the metrics accumulated on the
  device since the last log step."""
  return {"metrics": metrics_cls.empty()}


def guard(state: TrainState, new_state: TrainState, out: dict, train_config):
  """The state after a step, as the divergence guard (`state.Guard`) lets it through: (state, finite).

  A step whose loss or gradient norm is NaN/Inf is never committed: the run keeps its old state and stops as
  diverged, or, with train.skip_nonfinite_steps, skips the step (its step count, and the optimiser's, still
  advance: the next batch and the schedules follow the step count) unless more than train.max_nonfinite_share
  of its last train.nonfinite_window steps were skipped, which makes it diverged too. The state of a run that
  has diverged no longer changes at all. `finite` says whether the step was committed.
  """
  g = state.guard
  alive = g.diverged_step < 0
  ok = jnp.isfinite(out["loss"]) & jnp.isfinite(out["grad_norm"])
  bad = alive & ~ok
  first = (g.first_bad_step < 0) & bad
  number = state.step + 1  # the 1-based number of this step
  if train_config.skip_nonfinite_steps:
    window = g.recent.shape[0]
    recent = g.recent.at[state.step % window].set(bad)
    seen = jnp.minimum(number, window)
    diverges = bad & (jnp.sum(recent.astype(jnp.int32)) > train_config.max_nonfinite_share * seen)
    skipped, advances = g.skipped + bad.astype(jnp.int32), alive & ~diverges
  else:
    recent, diverges, skipped, advances = g.recent, bad, g.skipped, alive & ~bad
  commit = alive & ok

  def optimizer_leaf(new, old):
    # The optimiser's own step count advances with the run's, so that its LR schedule follows the step count.
    return jnp.where(advances if jnp.issubdtype(new.dtype, jnp.integer) else commit, new, old)

  strip = lambda s: s.replace(guard=None, opt_state=None)
  kept = jax.tree.map(lambda new, old: jnp.where(commit, new, old), strip(new_state), strip(state))
  kept = kept.replace(opt_state=jax.tree.map(optimizer_leaf, new_state.opt_state, state.opt_state))
  new_guard = g.replace(
      first_bad_step=jnp.where(first, number, g.first_bad_step),
      terms={k: jnp.where(first, out[k], v) for k, v in g.terms.items()},
      skipped=skipped, recent=jnp.where(alive, recent, g.recent),
      diverged_step=jnp.where(diverges, number, g.diverged_step))
  return kept.replace(step=jnp.where(advances, state.step + 1, state.step), guard=new_guard), commit


def accumulate(carry, out: dict, committed, metrics_cls):
  """The carry with one step's metrics merged in; a step that was not committed leaves the averages."""
  # clu wants a leading axis on masked values.
  step_metrics = metrics_cls.single_from_model_output(
      **{k: jnp.where(committed, v, 0.0)[None] for k, v in out.items()}, mask=committed[None])
  return {**carry, "metrics": carry["metrics"].merge(step_metrics)}


def guarded_step(state: TrainState, carry, batch, rng, ctx: StepContext, metrics_cls):
  """`train_step` as the training loop runs it for a run alone: (new state, new carry), nothing else to read
  back (see `guard`)."""
  new_state, out = train_step(state, batch, rng, ctx)
  state, committed = guard(state, new_state, out, ctx.config.train)
  return state, accumulate(carry, out, committed, metrics_cls)


def _take(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def run_context(ctx: StepContext, hp: dict, optimizer: bool = True) -> StepContext:
  """The step context of one run of a stacked program: the group's values (`ctx.hp`, any member's) with the
  fields in which the runs differ replaced by this run's (traced) `hp`, and (`optimizer`) the optimiser made
  from them; without it, the context's optimiser is the group's, for code that computes only the loss."""
  if not hp:
    return ctx
  merged = {**ctx.hp, **hp}
  return dataclasses.replace(ctx, hp=merged, tx=make_optimizer(ctx.config, merged) if optimizer else ctx.tx)


def stacked_step(state: TrainState, carry, batch, inputs, ctx: StepContext, metrics_cls, isolate: bool):
  """The guarded steps of R runs as one program: (new state, new carry), both with a leading run axis.

  `batch` holds one train batch per input stream (a leading stream axis; runs of one seed share a stream) and
  `inputs` the per-run inputs: "rng" (each run's step key), "hp" (the traced fields in which the runs differ,
  `hyperparams.of_config`), "seed_index" (each run's stream) and "stream_rng" (per stream, the step key of its
  seed, which makes the views: runs of one seed make the same views, so they are made once per stream).

  The gradient is that of the sum of the runs' losses with respect to the stacked parameters: the runs are
  independent, so each run's gradient is its own loss's, while the kernel gradients of the convolutions become
  batch-grouped convolutions (vmap of grad makes them feature-grouped ones whose window is the whole output
  gradient, which GPUs run slowly). The update, the EMA, the SeMi state and the guard stay per run. A run that has
  diverged is frozen (`guard`): its parameters enter the forward pass as zeros, so that it computes finite
  numbers that are thrown away. With `isolate` (grouped convolutions, which some backends expand with a mask that
  spreads a NaN of one group into every group), a step in which a run with a finite loss gets non-finite
  gradients recomputes every run's gradient on its own, so that one diverging run cannot poison the others.
  """
  vmap = functools.partial(jax.vmap, spmd_axis_name=run_axis.RUN_AXIS)
  images = jax.vmap(lambda b, rng: input_images(b, rng, ctx))(batch, inputs["stream_rng"])
  labels = {k: v for k, v in batch.items() if k not in ("images", "positions")}
  alive = state.guard.diverged_step < 0
  params = jax.tree.map(lambda p: jnp.where(alive.reshape((-1,) + (1,) * (p.ndim - 1)), p, jnp.zeros_like(p)),
                        state.params)

  def loss_one(params, state, hp, rng, stream, images, labels):
    return loss_and_aux(params, state, images[stream], _take(labels, stream), rng,
                        run_context(ctx, hp, optimizer=False))

  run_inputs = (state, inputs["hp"], inputs["rng"], inputs["seed_index"])

  def summed(params):
    totals, aux = vmap(loss_one, in_axes=(0, 0, 0, 0, 0, None, None))(params, *run_inputs, images, labels)
    return jnp.sum(totals), aux

  grads, (batch_stats, metrics, aux) = jax.grad(summed, has_aux=True)(params)
  if isolate:
    loss_ok = jnp.isfinite(metrics["loss"])
    grads_ok = jnp.isfinite(jax.vmap(optax.global_norm)(grads))
    grads = jax.lax.cond(
        jnp.any(alive & loss_ok & ~grads_ok),
        lambda: run_axis.map_runs(lambda p, *rest: jax.grad(lambda q: loss_one(q, *rest)[0])(p), ctx.mesh,
                                  (params, *run_inputs), (images, labels)),
        lambda: grads)

  def update_one(state, grads, batch_stats, metrics, aux, hp, carry):
    c = run_context(ctx, hp)
    new_state, out = apply_gradients(state, grads, batch_stats, metrics, aux, c)
    new_state, committed = guard(state, new_state, out, c.config.train)
    return new_state, accumulate(carry, out, committed, metrics_cls)

  return vmap(update_one)(state, grads, batch_stats, metrics, aux, inputs["hp"], carry)


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
