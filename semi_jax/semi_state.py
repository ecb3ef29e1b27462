"""SeMi's own state and its update after each step: memory-bank push and decay, class-frequency monitor,
consistency centre.

`update` is the one place where this state changes; the objective only reads it (`objective.compute_objective`
returns in `Aux` what the update needs).
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from semi_jax import algorithms, hyperparams, memory_bank
from semi_jax.hyperparams import choose

def decay_due(step, last_decay_step, interval, steps_per_epoch: int, clock):
  """Whether the bank decays after step `step` (0-based). epoch: the reference's `(batch_idx + 1) % decay_step
  == 0` with batch_idx restarting every epoch; global: `interval` steps after the last decay."""
  return choose(clock, algorithms.DECAY_CLOCKS, {
      "epoch": lambda: ((step % steps_per_epoch) + 1) % interval == 0,
      "global": lambda: (step + 1 - last_decay_step) >= interval}, "bank.decay_clock")


@flax.struct.dataclass
class SemiState:
  bank: memory_bank.MemoryBank
  last_decay_step: jnp.ndarray  # step count at the last bank confidence decay
  label_counts: jnp.ndarray  # f32[C]: confident pseudo-labels per class, accumulated (class-frequency monitor)
  class_weight: jnp.ndarray  # f32[C]: per-class factor of the prototype-mixing weight, refreshed every epoch
  qbar: jnp.ndarray  # f32[D]: EMA centre of the consistency teacher
  # Diagnostics, never read by the loss: per-class pseudo-label counts summed since the last evaluation
  # (`pseudo_label_counts`). In the state so that a resumed run reports what an uninterrupted one does.
  pseudo_counts: dict


PSEUDO_COUNT_NAMES = ("true", "confident", "confident_known", "correct", "confident_of_true")


def empty_pseudo_counts(num_classes: int) -> dict:
  return {k: jnp.zeros((num_classes,), jnp.float32) for k in PSEUDO_COUNT_NAMES}


def pseudo_label_counts(target, mask, u_label, num_classes: int) -> dict:
  """Per-class counts of one step's confident pseudo-labels (`target` where `mask`) against the unlabeled data's
  true labels (`u_label`, -1 where unknown): diagnostics, never in the loss. f32[C] each (PSEUDO_COUNT_NAMES):
  true (known labels of class c), confident (confident pseudo-labels of class c, known or not; what the monitor
  counts), confident_known (the same among known labels), correct (confident, class c and right),
  confident_of_true (true class c and confident)."""
  known = u_label >= 0
  true = jnp.where(known, u_label, 0)  # (unknown rows carry weight 0 below)
  conf, kn = mask.astype(jnp.float32), known.astype(jnp.float32)
  count = lambda index, weight: jnp.zeros((num_classes,), jnp.float32).at[index].add(weight)
  return {"true": count(true, kn), "confident": count(target, conf), "confident_known": count(target, conf * kn),
          "correct": count(target, conf * kn * (target == true)), "confident_of_true": count(true, conf * kn)}


def init(num_classes: int, feature_dim: int, bank_size: int, bank_dtype: str = "float32") -> SemiState:
  return SemiState(
      bank=memory_bank.init_bank(num_classes, bank_size, feature_dim, jnp.dtype(bank_dtype)),
      last_decay_step=jnp.zeros((), jnp.int32),
      label_counts=jnp.zeros((num_classes,), jnp.float32),
      class_weight=jnp.ones((num_classes,), jnp.float32),
      qbar=jnp.zeros((feature_dim,), jnp.float32),
      pseudo_counts=empty_pseudo_counts(num_classes))


def monitor_class_weight(counts, epoch, df, kind: str):
  """Per-class factor of the prototype-mixing weight from the accumulated confident pseudo-label counts."""
  total = jnp.sum(counts)
  freq = counts / jnp.maximum(total, 1.0)
  inv = jnp.where(counts > 0, total / jnp.maximum(counts, 1.0), 0.0)
  inv = inv / jnp.maximum(jnp.sum(inv), 1e-12)
  power = 1.0 - df ** (epoch + 1.0)
  safe_log = lambda p: jnp.log(jnp.maximum(p, 1e-12))
  return choose(kind, algorithms.CLASS_WEIGHTS, {
      "frequency": lambda: freq,  # the reference's choice ("inv_base" there)
      "decayed_frequency": lambda: jnp.exp(safe_log(freq) * power),
      "decayed_inverse": lambda: jnp.exp(safe_log(inv) * power),
      "uniform": lambda: jnp.ones_like(counts)}, "plce.class_weight")


def update(semi: SemiState, aux, step, config, hp: dict | None = None, gather=lambda x: x) -> tuple[SemiState, dict]:
  """The SeMi state after step `step` (0-based) from the objective's `aux` (`objective.Aux`).

  - bank (bank.enabled): both strong views' features enter as candidates with the confidence and class of their
    weak view's pseudo-label, where it is confident; every `bank.decay_every` steps (on `bank.decay_clock`,
    `decay_due`) the entries not written since the last decay lose confidence (x `bank.beta`). `gather` places
    the candidates on every device before the push (the bank is replicated), so each device updates its copy
    locally.
  - monitor: confident pseudo-labels counted per class; at the last step of every epoch the prototype-mixing
    class weight is recomputed from the counts (of the whole run, or of that epoch: `plce.class_weight_counts`).
  - consistency centre (cons.enabled, after the warm-up): qbar <- m qbar + (1 - m) mean(teacher).
  - pseudo-label diagnostics: `pseudo_label_counts` added to `pseudo_counts` (the trainer zeroes them at every
    evaluation).
  Returns (new state, metrics).
  """
  hp = hyperparams.of_config(config) if hp is None else hp
  metrics = {}
  bank, last_decay = semi.bank, semi.last_decay_step
  if config.bank.enabled:
    twice = lambda a: gather(jnp.concatenate([a, a], axis=0))
    feats = gather(jax.lax.stop_gradient(jnp.concatenate(aux.f_strong, axis=0)))
    bank = memory_bank.push(bank, feats, twice(aux.conf), twice(aux.target), twice(aux.mask))
    interval = jnp.maximum(jnp.round(hp["bank.decay_every"](step)).astype(jnp.int32), 1)
    due = decay_due(step, last_decay, interval, config.train.steps_per_epoch, hp["bank.decay_clock"])
    bank = jax.lax.cond(due, memory_bank.decay, lambda b, _: b, bank, hp["bank.beta"](step))
    last_decay = jnp.where(due, step + 1, last_decay)
    fill = memory_bank.fill_fraction(bank)
    metrics.update(bank_fill=jnp.mean(fill), bank_fill_min=jnp.min(fill),
                   bank_confidence=jnp.mean(memory_bank.mean_confidence(bank)))

  spe = config.train.steps_per_epoch
  step_counts = pseudo_label_counts(aux.target, aux.mask, aux.u_label, semi.label_counts.shape[0])
  counts = semi.label_counts + step_counts["confident"]
  epoch_end = (step % spe) == (spe - 1)
  class_weight = jax.lax.cond(
      epoch_end,
      lambda: monitor_class_weight(counts, step // spe, hp["ssl.monitor_df"](step), hp["plce.class_weight"]),
      lambda: semi.class_weight)

  qbar = semi.qbar
  if config.cons.enabled:
    m = hp["cons.center_momentum"]
    qbar = jnp.where(aux.after_warmup, m * semi.qbar + (1.0 - m) * aux.teacher_mean, semi.qbar)
  # With per-epoch counts the refreshed weight used this epoch's counts: start anew.
  counts = choose(hp["plce.class_weight_counts"], algorithms.COUNT_WINDOWS, {
      "run": lambda: counts, "epoch": lambda: jnp.where(epoch_end, jnp.zeros_like(counts), counts)},
      "plce.class_weight_counts")
  pseudo_counts = {k: v + step_counts[k] for k, v in semi.pseudo_counts.items()}
  return semi.replace(bank=bank, last_decay_step=last_decay, label_counts=counts, class_weight=class_weight,
                      qbar=qbar, pseudo_counts=pseudo_counts), metrics
