"""The jitted train and eval steps: pure functions, no Python side effects, no host transfers.

One train step = one forward pass over concat(labeled, weak, strong, strong'), the FixMatch / ACR / SeMi
objective, the SGD update, the EMA update and every piece of SeMi state (memory bank push and decay,
class-frequency monitor, consistency centre). Which parts run is fixed by the config at trace time.

Batch keys (see input_pipeline): x uint8[B,H,W,3], y int32[B], u_weak / u_strong1 / u_strong2 uint8[U,H,W,3],
u_label int32[U] (true label for diagnostics only, -1 if unknown; never in the loss), u_index int32[U].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from semi_jax import losses, memory_bank, miner, schedules
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
  # The mesh the step runs on. Given, the memory-bank candidates are gathered to every device before the
  # push, so the replicated bank is updated locally instead of being all-reduced as a [C, K, D] table.
  mesh: Any = None

  def replicate(self, x):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec()))

  def schedule(self, name_cfg):
    t = self.config.train
    return schedules.make_schedule(name_cfg, t.total_steps, t.steps_per_epoch)


def normalize(images, mean, std):
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def interleave_rows(x, groups):
  """The reference's `interleave`: row order of a batch that was interleaved before the forward pass."""
  return x.reshape((-1, groups) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def prototype_targets(features, protos, has_proto, tau):
  """softmax(-||f - P_c|| / tau) over the classes that have a prototype (uniform while the bank is empty)."""
  d2 = jnp.sum((features[:, None, :] - protos[None, :, :]) ** 2, axis=-1)
  dist = jnp.sqrt(jnp.maximum(d2, 0.0))
  any_proto = jnp.any(has_proto)
  logits = jnp.where(has_proto[None, :] | ~any_proto, -dist / tau, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def monitor_class_weight(counts, epoch, df, kind: str):
  """Per-class factor of the prototype-mixing weight from the accumulated confident pseudo-label counts."""
  total = jnp.sum(counts)
  freq = counts / jnp.maximum(total, 1.0)
  inv = jnp.where(counts > 0, total / jnp.maximum(counts, 1.0), 0.0)
  inv = inv / jnp.maximum(jnp.sum(inv), 1e-12)
  power = 1.0 - df ** (epoch + 1.0)
  safe_log = lambda p: jnp.log(jnp.maximum(p, 1e-12))
  if kind == "frequency":  # the reference's choice ("inv_base" there)
    return freq
  if kind == "decayed_frequency":
    return jnp.exp(safe_log(freq) * power)
  if kind == "decayed_inverse":
    return jnp.exp(safe_log(inv) * power)
  if kind == "uniform":
    return jnp.ones_like(counts)
  raise ValueError(f"unknown plce.class_weight {kind!r}; choose frequency, decayed_frequency, decayed_inverse "
                   "or uniform.")


def _masked_mean(values, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def compute_objective(logits, logits_b, feats, batch, semi, step, ctx: StepContext):
  """The FixMatch / ACR / SeMi loss from the outputs of one forward pass over concat(x, u_w, u_s, u_s').

  Returns (total loss, metrics dict, aux) where aux carries what the state updates need (pseudo-label
  confidence / class / mask, strong-view features, new consistency centre).
  """
  cfg = ctx.config
  after_warmup = (step // cfg.train.steps_per_epoch) > cfg.ssl.est_epoch
  threshold = ctx.schedule(cfg.ssl.threshold)(step)
  prior = jnp.asarray(ctx.class_prior, jnp.float32)
  temperature = cfg.ssl.temperature
  b = batch["x"].shape[0]
  u = batch["u_weak"].shape[0]
  if cfg.ssl.reference_row_order:
    feats = interleave_rows(feats, 4)  # reference bug reproduction (mu == 1 enforced by validation)
  logits_x, logits_uw, logits_us1, logits_us2 = jnp.split(logits, [b, b + u, b + 2 * u])
  f_uw, f_us1, f_us2 = jnp.split(feats[b:], 3)
  out = {}

  # --- supervised terms --------------------------------------------------------------------------------------
  adjust_x = losses.logit_adjustment(prior, cfg.ssl.tau2) if cfg.ssl.labeled_logit_adjust else 0.0
  loss_x = jnp.mean(losses.cross_entropy(logits_x + adjust_x, batch["y"]))

  # --- pseudo-labels of the standard head --------------------------------------------------------------------
  logits_uw_sg = jax.lax.stop_gradient(logits_uw)
  p_t = jax.nn.softmax(logits_uw_sg / temperature, axis=-1)
  pl = (jax.nn.softmax((logits_uw_sg - losses.logit_adjustment(prior, cfg.ssl.tau1)) / temperature, axis=-1)
        if cfg.ssl.pula else p_t)
  if cfg.plce.enabled:
    protos, has_proto = memory_bank.prototypes(semi.bank)
    targets_pc = prototype_targets(jax.lax.stop_gradient(f_us1), protos, has_proto, cfg.plce.tau_tar)
    ramp = ctx.schedule(cfg.plce.ramp)(step)
    w = cfg.plce.alpha * ramp * semi.class_weight  # per class
    w = jnp.where(after_warmup & jnp.any(has_proto), w, 0.0)
    mixed = (1.0 - w) * pl + w * targets_pc
    if cfg.plce.renormalize:
      mixed = mixed / jnp.sum(mixed, axis=-1, keepdims=True)
    pl = mixed
    out["plce_weight"] = jnp.mean(w)
  pl = jax.lax.stop_gradient(pl)
  conf, target = jnp.max(pl, axis=-1), jnp.argmax(pl, axis=-1)
  mask = conf >= threshold
  mask_t = jnp.max(p_t, axis=-1) >= threshold
  mask_ss = mask | mask_t

  # --- hard-example mining -----------------------------------------------------------------------------------
  if cfg.miner.enabled:
    scale = ctx.schedule(cfg.miner.scale)(step)
    # Only examples that pass the mask enter Lu: rank among them, so the hard slots are not spent on rows
    # the loss ignores (the entropy weights themselves do not depend on it).
    mined = miner.mine(pl, mode=cfg.miner.mode, scale=scale, hard_fraction=cfg.miner.hard_fraction,
                       valid=mask_ss)
    ohem = jnp.where(after_warmup, mined.weights, 1.0)
    out["ohem_weight"] = jnp.mean(ohem)
    out["entropy_hard"] = _masked_mean(mined.entropy, mined.is_hard)
    out["entropy_easy"] = _masked_mean(mined.entropy, ~mined.is_hard)
  else:
    ohem = jnp.ones((u,), jnp.float32)
  weights_u = mask_ss.astype(jnp.float32) * ohem
  loss_u = 0.5 * (losses.weighted_mean_ce(logits_us1, target, weights_u)
                  + losses.weighted_mean_ce(logits_us2, target, weights_u))
  total = loss_x + loss_u

  # --- balanced head (ACR) -------------------------------------------------------------------------------------
  if cfg.ssl.dual_head:
    lb_x, lb_uw, lb_us1, lb_us2 = jnp.split(logits_b, [b, b + u, b + 2 * u])
    loss_x_b = jnp.mean(losses.cross_entropy(lb_x + losses.logit_adjustment(prior, cfg.ssl.tau2), batch["y"]))
    p_h2 = jax.nn.softmax((logits_uw_sg - losses.logit_adjustment(prior, cfg.ssl.tau12)) / temperature, -1)
    p_b = jax.nn.softmax(jax.lax.stop_gradient(lb_uw) / temperature, axis=-1)
    mask_h2 = jnp.max(p_h2, axis=-1) >= threshold
    mask_b = jnp.max(p_b, axis=-1) >= threshold
    mask_ss_b = (mask_h2 | mask_b).astype(jnp.float32)
    target_h2 = jnp.argmax(p_h2, axis=-1)
    loss_u_b = 0.5 * (losses.weighted_mean_ce(lb_us1, target_h2, mask_ss_b)
                      + losses.weighted_mean_ce(lb_us2, target_h2, mask_ss_b))
    total = total + loss_x_b + loss_u_b
    out.update(loss_x_b=loss_x_b, loss_u_b=loss_u_b, mask_rate_b=jnp.mean(mask_ss_b))

  # --- projection consistency (unconfident examples) --------------------------------------------------------
  new_qbar = semi.qbar
  if cfg.cons.enabled:
    q_w = jax.nn.softmax((jax.lax.stop_gradient(f_uw) - semi.qbar) / (cfg.cons.proto_t / 5.0), axis=-1)
    inv_mask = (~mask_ss).astype(jnp.float32)
    cons_terms = 0.5 * (losses.soft_cross_entropy(q_w, f_us1 / cfg.cons.proto_t)
                        + losses.soft_cross_entropy(q_w, f_us2 / cfg.cons.proto_t))
    loss_cons = jnp.where(after_warmup, jnp.mean(cons_terms * inv_mask), 0.0)
    total = total + cfg.cons.weight * loss_cons
    m = cfg.cons.center_momentum
    new_qbar = jnp.where(after_warmup, m * semi.qbar + (1.0 - m) * jnp.mean(q_w, axis=0), semi.qbar)
    out["loss_cons"] = loss_cons

  # --- diagnostics (true labels of the unlabeled data never enter the loss) -------------------------------------
  known = batch["u_label"] >= 0
  correct = target == batch["u_label"]
  out.update(
      loss=total, loss_x=loss_x, loss_u=loss_u, mask_rate=jnp.mean(mask.astype(jnp.float32)),
      mask_rate_ss=jnp.mean(mask_ss.astype(jnp.float32)), threshold=threshold,
      pseudo_label_acc=_masked_mean(correct, known & mask_ss),
      pseudo_label_acc_all=_masked_mean(correct, known))
  aux = dict(conf=conf, target=target, mask_ss=mask_ss, f_us=(f_us1, f_us2), qbar=new_qbar)
  return total, out, aux


def train_step(state: TrainState, batch, rng, ctx: StepContext):
  cfg = ctx.config
  step = state.step
  spe = cfg.train.steps_per_epoch
  epoch = step // spe
  mean, std = jnp.asarray(ctx.mean, jnp.float32), jnp.asarray(ctx.std, jnp.float32)
  num_classes = len(ctx.class_prior)
  inputs = jnp.concatenate([normalize(batch[k], mean, std) for k in ("x", "u_weak", "u_strong1", "u_strong2")])
  dropout_rng = jax.random.fold_in(rng, step)
  semi = state.semi

  def loss_fn(params):
    (logits, logits_b, feats), updates = ctx.model.apply(
        {"params": params, "batch_stats": state.batch_stats}, inputs, train=True, mutable=["batch_stats"],
        rngs={"dropout": dropout_rng})
    total, out, aux = compute_objective(logits, logits_b, feats, batch, semi, step, ctx)
    return total, (updates["batch_stats"], out, aux)

  grads, (batch_stats, out, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - cfg.optim.ema_decay)
  out["grad_norm"] = optax.global_norm(grads)

  # --- SeMi state ------------------------------------------------------------------------------------------
  bank, last_decay = semi.bank, semi.last_decay_step
  if cfg.bank.enabled:
    f_us = ctx.replicate(jax.lax.stop_gradient(jnp.concatenate(aux["f_us"], axis=0)))
    twice = lambda a: ctx.replicate(jnp.concatenate([a, a], axis=0))
    bank = memory_bank.push(bank, f_us, twice(aux["conf"]), twice(aux["target"]), twice(aux["mask_ss"]))
    interval = jnp.maximum(jnp.round(ctx.schedule(cfg.bank.decay_every)(step)).astype(jnp.int32), 1)
    due = (step + 1 - last_decay) >= interval
    beta = ctx.schedule(cfg.bank.beta)(step)
    bank = jax.lax.cond(due, memory_bank.decay, lambda b, _: b, bank, beta)
    last_decay = jnp.where(due, step + 1, last_decay)
    fill = memory_bank.fill_fraction(bank)
    out.update(bank_fill=jnp.mean(fill), bank_fill_min=jnp.min(fill),
               bank_confidence=jnp.mean(memory_bank.mean_confidence(bank)))
  counts = semi.label_counts + jnp.zeros((num_classes,), jnp.float32).at[aux["target"]].add(
      aux["mask_ss"].astype(jnp.float32))
  epoch_end = (step % spe) == (spe - 1)
  df = ctx.schedule(cfg.ssl.monitor_df)(step)
  class_weight = jnp.where(epoch_end, monitor_class_weight(counts, epoch, df, cfg.plce.class_weight),
                           semi.class_weight)
  out["lr"] = cfg.optim.lr * ctx.schedule(cfg.optim.lr_schedule)(step)

  new_state = state.replace(
      step=step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params,
      semi=semi.replace(bank=bank, last_decay_step=last_decay, label_counts=counts, class_weight=class_weight,
                        qbar=aux["qbar"]))
  return new_state, out


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
