"""The FixMatch / FixMatch+LA / ACR / SeMi objective, in named pieces: pure functions of one forward pass.

Notation as in SEMI_SPEC: x the labeled batch, u_w the weak view of the unlabeled batch, u_s and u_s' its two
strong views; z the standard head `fc`, z_b the balanced head `fc1`, f the features. `compute_objective`
composes the pieces:
  pseudo_labels       p_w = softmax(z(u_w) / T) under stop-gradient (logit-adjusted with `pula`)
  mix_prototypes      PLCE: p_w mixed with softmax(-||f(u_s) - P_c|| / tau) towards the bank's prototypes
  mining_weights      OHEML: per-example weights from the entropy of the pseudo-labels (miner.py)
  unlabeled_loss      Lu: masked, mined CE of both strong views against argmax of the pseudo-labels
  balanced_head_loss  ACR: Lx_b (logit-adjusted labeled CE) and Lu_b on the balanced head
  consistency_loss    Lcons: the centred weak-view feature distribution taught to the strong views
and returns the total, the metrics and `aux`, what `semi_state.update` needs after the step. Which pieces run
is fixed by the config at trace time; the warm-up (`ssl.est_epoch`) only switches values, so the program is
the same before and after it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from semi_jax import hyperparams, losses, memory_bank, miner

class Views(NamedTuple):
  """One model output split by input group, each in global batch order."""
  x: jax.Array
  u_weak: jax.Array
  u_strong1: jax.Array
  u_strong2: jax.Array


class Aux(NamedTuple):
  """What the SeMi state update needs from the objective (all under stop-gradient)."""
  conf: jax.Array  # f32[U] confidence of the (mixed) pseudo-label
  target: jax.Array  # int32[U] its class
  mask: jax.Array  # bool[U] mask_ss: confident under the mixed or the plain pseudo-label
  f_strong: tuple[jax.Array, jax.Array]  # f(u_s), f(u_s'): the bank's candidates
  teacher_mean: jax.Array  # f32[D] batch mean of the consistency teacher (zeros without Lcons)
  after_warmup: jax.Array  # bool[]
  u_label: jax.Array  # int32[U] true labels of the unlabeled rows, -1 where unknown (diagnostics only)


def interleave_rows(x, groups):
  """The reference's `interleave`: row order of a batch that was interleaved before the forward pass."""
  return x.reshape((-1, groups) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def _masked_mean(values, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def pseudo_labels(logits_uw, class_prior, *, temperature: float, pula: bool, tau1: float):
  """(p_plain, p): softmax(z(u_w) / T), and the pseudo-labels of the standard head (from z(u_w) - tau1 log py
  with `pula`), both under stop-gradient."""
  logits_uw = jax.lax.stop_gradient(logits_uw)
  p_plain = jax.nn.softmax(logits_uw / temperature, axis=-1)
  if not pula:
    return p_plain, p_plain
  return p_plain, jax.nn.softmax((logits_uw - losses.logit_adjustment(class_prior, tau1)) / temperature, axis=-1)


def prototype_targets(features, protos, has_proto, tau):
  """softmax(-||f - P_c|| / tau) over the classes that have a prototype (uniform while the bank is empty)."""
  d2 = jnp.sum((features[:, None, :] - protos[None, :, :]) ** 2, axis=-1)
  dist = jnp.sqrt(jnp.maximum(d2, 0.0))
  any_proto = jnp.any(has_proto)
  logits = jnp.where(has_proto[None, :] | ~any_proto, -dist / tau, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def mix_prototypes(p, f_strong, bank, weight, *, tau: float, renormalize: bool):
  """PLCE: (1 - w_c) p + w_c softmax(-||f(u_s) - P_c|| / tau) with the per-class weight w [C] (zero while the
  bank holds no prototype). Returns (mixed pseudo-labels, w)."""
  protos, has_proto = memory_bank.prototypes(bank)
  targets = prototype_targets(jax.lax.stop_gradient(f_strong), protos, has_proto, tau)
  weight = jnp.where(jnp.any(has_proto), weight, 0.0)
  mixed = (1.0 - weight) * p + weight * targets
  if renormalize:  # per-class weights leave rows that do not sum to 1
    mixed = mixed / jnp.sum(mixed, axis=-1, keepdims=True)
  return mixed, weight


def mining_weights(p, valid, *, mode: str, scale, hard_fraction: float, active):
  """OHEML weights of the unlabeled examples (1 while not `active`), and the miner's diagnostics.

  Only examples that pass the mask enter Lu: the ranking is among them (`valid`), so the hard slots are not spent
  on rows the loss ignores (the entropy weights themselves do not depend on it).
  """
  mined = miner.mine(p, mode=mode, scale=scale, hard_fraction=hard_fraction, valid=valid)
  weights = jnp.where(active, mined.weights, 1.0)
  return weights, {"ohem_weight": jnp.mean(weights),
                   "entropy_hard": _masked_mean(mined.entropy, mined.is_hard),
                   "entropy_easy": _masked_mean(mined.entropy, ~mined.is_hard)}


def unlabeled_loss(logits_us1, logits_us2, target, weights):
  """Lu: mean over both strong views of CE(z(u_s*), target) * weight (masked rows count in the mean)."""
  return 0.5 * (losses.weighted_mean_ce(logits_us1, target, weights)
                + losses.weighted_mean_ce(logits_us2, target, weights))


def balanced_head_loss(logits_b: Views, logits_uw, y, class_prior, *, tau2: float, tau12: float,
                       temperature: float, threshold):
  """ACR's balanced head: Lx_b = CE(z_b(x) + tau2 log py, y) and Lu_b, whose pseudo-labels come from
  softmax(z(u_w) - tau12 log py) or from z_b(u_w), on the examples where either is confident.
  Returns (Lx_b, Lu_b, mask rate)."""
  loss_x_b = jnp.mean(losses.cross_entropy(logits_b.x + losses.logit_adjustment(class_prior, tau2), y))
  logits_uw = jax.lax.stop_gradient(logits_uw)
  p_h2 = jax.nn.softmax((logits_uw - losses.logit_adjustment(class_prior, tau12)) / temperature, -1)
  p_b = jax.nn.softmax(jax.lax.stop_gradient(logits_b.u_weak) / temperature, axis=-1)
  mask = ((jnp.max(p_h2, axis=-1) >= threshold) | (jnp.max(p_b, axis=-1) >= threshold)).astype(jnp.float32)
  loss_u_b = unlabeled_loss(logits_b.u_strong1, logits_b.u_strong2, jnp.argmax(p_h2, axis=-1), mask)
  return loss_x_b, loss_u_b, jnp.mean(mask)


def consistency_loss(f_uw, f_us1, f_us2, qbar, weights, *, proto_t: float):
  """Lcons: CE between the teacher softmax((f(u_w) - qbar) / (proto_t / 5)) (stop-gradient) and
  log_softmax(f(u_s*) / proto_t), weighted per example. Returns (loss, batch mean of the teacher)."""
  teacher = jax.nn.softmax((jax.lax.stop_gradient(f_uw) - qbar) / (proto_t / 5.0), axis=-1)
  terms = 0.5 * (losses.soft_cross_entropy(teacher, f_us1 / proto_t)
                 + losses.soft_cross_entropy(teacher, f_us2 / proto_t))
  return jnp.mean(terms * weights), jnp.mean(teacher, axis=0)


def compute_objective(logits: Views, logits_b: Views, feats: Views, y, u_label, semi, step, config, class_prior,
                      hp: dict | None = None):
  """The loss of one step from the outputs of one forward pass over (x, u_w, u_s, u_s').

  `semi` is the SeMi state before the step (bank, monitor class weight, consistency centre), `u_label` the true
  labels of the unlabeled batch (-1 where unknown), used only for diagnostics, never in the loss. `config` gives
  the structure (which parts run), `hp` (`hyperparams.of_config`, default: the config's) every value that runs may
  differ in. Returns (total loss, metrics dict, Aux).
  """
  hp = hyperparams.of_config(config) if hp is None else hp
  s = config.ssl
  after_warmup = (step // config.train.steps_per_epoch) > hp["ssl.est_epoch"]
  threshold = hp["ssl.threshold"](step)
  prior = jnp.asarray(class_prior, jnp.float32)
  if s.reference_row_order:  # reproduces the reference's feature rows (mu == 1 enforced by validation)
    rows = interleave_rows(jnp.concatenate(feats), 4)
    feats = Views(*jnp.split(rows, [len(feats.x), len(feats.x) + len(feats.u_weak),
                                    len(feats.x) + 2 * len(feats.u_weak)]))
  metrics = {}

  # Supervised term.
  adjust_x = losses.logit_adjustment(prior, hp["ssl.tau2"]) if s.labeled_logit_adjust else 0.0
  loss_x = jnp.mean(losses.cross_entropy(logits.x + adjust_x, y))

  # Pseudo-labels of the standard head, mixed with the prototypes, and their masks.
  p_plain, p = pseudo_labels(logits.u_weak, prior, temperature=hp["ssl.temperature"], pula=s.pula,
                             tau1=hp["ssl.tau1"])
  if config.plce.enabled:
    ramp = hp["plce.ramp"](step)
    weight = jnp.where(after_warmup, hp["plce.alpha"] * ramp * semi.class_weight, 0.0)
    p, weight = mix_prototypes(p, feats.u_strong1, semi.bank, weight, tau=hp["plce.tau_tar"],
                               renormalize=config.plce.renormalize)
    metrics["plce_weight"] = jnp.mean(weight)
  p = jax.lax.stop_gradient(p)
  conf, target = jnp.max(p, axis=-1), jnp.argmax(p, axis=-1)
  mask = conf >= threshold
  mask_ss = mask | (jnp.max(p_plain, axis=-1) >= threshold)

  # Hard-example mining and the unlabeled loss.
  weights = mask_ss.astype(jnp.float32)
  if config.miner.enabled:
    scale = hp["miner.scale"](step)
    ohem, mined = mining_weights(p, mask_ss, mode=config.miner.mode, scale=scale,
                                 hard_fraction=config.miner.hard_fraction, active=after_warmup)
    weights = weights * ohem
    metrics.update(mined)
  loss_u = unlabeled_loss(logits.u_strong1, logits.u_strong2, target, weights)
  total = loss_x + loss_u

  if s.dual_head:
    loss_x_b, loss_u_b, mask_rate_b = balanced_head_loss(
        logits_b, logits.u_weak, y, prior, tau2=hp["ssl.tau2"], tau12=hp["ssl.tau12"],
        temperature=hp["ssl.temperature"],
        threshold=threshold)
    total = total + loss_x_b + loss_u_b
    metrics.update(loss_x_b=loss_x_b, loss_u_b=loss_u_b, mask_rate_b=mask_rate_b)

  teacher_mean = jnp.zeros(feats.u_weak.shape[-1:], jnp.float32)
  if config.cons.enabled:  # on the unconfident examples, after the warm-up
    loss_cons, teacher_mean = consistency_loss(feats.u_weak, feats.u_strong1, feats.u_strong2, semi.qbar,
                                               (~mask_ss).astype(jnp.float32), proto_t=hp["cons.proto_t"])
    loss_cons = jnp.where(after_warmup, loss_cons, 0.0)
    total = total + hp["cons.weight"] * loss_cons
    metrics["loss_cons"] = loss_cons

  # Diagnostics: the true labels of the unlabeled data never enter the loss.
  known = u_label >= 0
  correct = target == u_label
  metrics.update(
      loss=total, loss_x=loss_x, loss_u=loss_u, mask_rate=jnp.mean(mask.astype(jnp.float32)),
      mask_rate_ss=jnp.mean(mask_ss.astype(jnp.float32)), threshold=threshold,
      pseudo_label_acc=_masked_mean(correct, known & mask_ss), pseudo_label_acc_all=_masked_mean(correct, known))
  aux = Aux(conf=conf, target=target, mask=mask_ss, f_strong=(feats.u_strong1, feats.u_strong2),
            teacher_mean=teacher_mean, after_warmup=after_warmup, u_label=u_label)
  return total, metrics, aux
