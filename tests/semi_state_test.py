"""The SeMi state update (semi_jax/semi_state.py): the class-frequency monitor, and when `update` decays the bank,
refreshes the class weight and moves the consistency centre, against a plain-Python simulation of the loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from semi_jax import memory_bank, objective, semi_state

STEPS = 1000
SPE = 7  # steps per epoch
DECAY_EVERY = 3
EST_EPOCH = 5  # warm-up: the epochs 0..5, steps 0..41
C, K, D, U = 4, 3, 6, 5  # classes, bank slots, feature dim, unlabeled batch


def test_monitor_class_weight_kinds():
  counts = jnp.asarray([6.0, 3.0, 1.0, 0.0])
  freq = np.array([0.6, 0.3, 0.1, 0.0])
  np.testing.assert_allclose(semi_state.monitor_class_weight(counts, 0, 0.99, "frequency"), freq, rtol=1e-6)
  # epoch 1, df 0.5: power = 1 - 0.5**2 = 0.75
  np.testing.assert_allclose(semi_state.monitor_class_weight(counts, 1, 0.5, "decayed_frequency"),
                             [0.6 ** 0.75, 0.3 ** 0.75, 0.1 ** 0.75, 0.0], rtol=1e-5, atol=1e-7)
  inv = np.array([10 / 6, 10 / 3, 10.0, 0.0])
  inv = inv / inv.sum()
  np.testing.assert_allclose(semi_state.monitor_class_weight(counts, 1, 0.5, "decayed_inverse")[:3],
                             inv[:3] ** 0.75, rtol=1e-5)
  np.testing.assert_allclose(semi_state.monitor_class_weight(counts, 3, 0.9, "uniform"), np.ones(4))
  with pytest.raises(ValueError, match="plce.class_weight"):
    semi_state.monitor_class_weight(counts, 0, 0.9, "nope")


def make_config():
  c = test_config.get_config()  # every SeMi part on
  c.train.steps_per_epoch = SPE
  c.train.total_steps = STEPS
  c.ssl.est_epoch = EST_EPOCH
  c.ssl.monitor_df.value = 0.8  # the epoch changes the decayed weights visibly for ~20 epochs
  c.bank.decay_every.value = float(DECAY_EVERY)
  c.bank.beta.value = 0.9
  c.plce.class_weight = "decayed_frequency"  # depends on the epoch, not only on the counts
  return c


def simulate(steps, steps_per_epoch, interval, est_epoch, momentum, masks, targets, teacher_means,
             restart_every_epoch=False):
  """The loop's arithmetic in plain Python: per step (decayed?, decays so far, step count at the last decay,
  label counts after the step, epoch whose end refreshes the class weight or None, consistency centre after the
  step)."""
  last_decay, decays, qbar = 0, 0, np.zeros(teacher_means.shape[1], np.float32)
  counts = np.zeros(C)
  out = []
  for step in range(steps):
    epoch = step // steps_per_epoch
    if restart_every_epoch and step % steps_per_epoch == 0:
      last_decay = step
    decayed = step + 1 - last_decay >= interval
    if decayed:
      decays, last_decay = decays + 1, step + 1
    np.add.at(counts, targets[step][masks[step]], 1.0)
    refresh = epoch if step % steps_per_epoch == steps_per_epoch - 1 else None
    if epoch > est_epoch:
      qbar = np.float32(momentum) * qbar + np.float32(1.0 - momentum) * teacher_means[step]
    out.append((decayed, decays, last_decay, counts.copy(), refresh, qbar))
  return out


def test_update_timing_matches_the_loop_over_many_steps():
  """1000 steps of `semi_state.update` (7 steps an epoch, a decay every 3 steps, warm-up to the end of epoch 5).

  - Bank decay at exactly the steps where (step + 1 - last decay) >= bank.decay_every, counted over the whole run.
    The reference restarts that count every epoch (it counts batch_idx); semi_jax keeps one global counter. The
    candidates are too weak to enter the full bank, so its confidences change only by decay: c0 * beta^decays.
  - The class weight changes only at the last step of an epoch, to monitor_class_weight(counts up to and
    including that step, epoch = step // steps_per_epoch).
  - qbar stays zero through the warm-up (step // steps_per_epoch <= ssl.est_epoch), then follows
    qbar <- m qbar + (1 - m) mean(teacher).
  """
  cfg = make_config()
  rng = np.random.default_rng(0)
  masks = rng.random((STEPS, U)) < 0.6
  targets = rng.integers(0, C, (STEPS, U)).astype(np.int32)
  teacher_means = rng.dirichlet(np.ones(D), STEPS).astype(np.float32)
  f_strong = rng.normal(size=(2, U, D)).astype(np.float32)
  conf0 = np.sort(rng.uniform(0.5, 1.0, (C, K)).astype(np.float32), axis=1)[:, ::-1].copy()
  bank = memory_bank.MemoryBank.from_ranked(rng.normal(size=(C, K, D)).astype(np.float32), conf0,
                                            np.ones((C, K), bool), np.zeros((C, K), bool))
  semi = semi_state.init(C, D, K).replace(bank=bank)
  # 0.5 * 0.9^334 is ~3e-16: candidates of confidence 1e-30 never beat a stored entry.
  weak = jnp.full((U,), 1e-30, jnp.float32)
  update = jax.jit(lambda s, a, step: semi_state.update(s, a, step, cfg)[0])
  expected = simulate(STEPS, SPE, DECAY_EVERY, EST_EPOCH, cfg.cons.center_momentum, masks, targets, teacher_means)
  df = cfg.ssl.monitor_df.value

  class_weight, conf, refreshes_that_moved = np.ones(C, np.float32), conf0, 0
  for step, (decayed, decays, last_decay, counts, refresh, qbar) in enumerate(expected):
    aux = objective.Aux(conf=weak, target=jnp.asarray(targets[step]), mask=jnp.asarray(masks[step]),
                        f_strong=(jnp.asarray(f_strong[0]), jnp.asarray(f_strong[1])),
                        teacher_mean=jnp.asarray(teacher_means[step]),
                        after_warmup=jnp.asarray(step // SPE > EST_EPOCH))
    semi = update(semi, aux, jnp.int32(step))
    got = jax.device_get(semi)
    at = f"step {step}"
    # Bank decay.
    if decayed:
      conf = conf * np.float32(cfg.bank.beta.value)
    assert int(got.last_decay_step) == last_decay, at
    np.testing.assert_allclose(got.bank.conf, conf, rtol=1e-5, err_msg=at)
    np.testing.assert_allclose(got.bank.conf, conf0 * cfg.bank.beta.value ** decays, rtol=1e-4, err_msg=at)
    assert got.bank.filled.all() and not got.bank.fresh.any(), at  # no candidate entered
    # Monitor.
    np.testing.assert_array_equal(got.label_counts, counts, err_msg=at)
    if refresh is None:
      np.testing.assert_array_equal(got.class_weight, class_weight, err_msg=at)
    else:
      assert refresh == step // SPE
      want = semi_state.monitor_class_weight(jnp.asarray(counts, jnp.float32), refresh, df, cfg.plce.class_weight)
      np.testing.assert_allclose(got.class_weight, want, rtol=1e-6, err_msg=at)
      refreshes_that_moved += int(np.abs(got.class_weight - class_weight).max() > 1e-6)
      class_weight = got.class_weight
    # Consistency centre.
    if step // SPE <= EST_EPOCH:
      np.testing.assert_array_equal(got.qbar, 0.0, err_msg=at)
    else:
      np.testing.assert_allclose(got.qbar, qbar, rtol=1e-5, atol=1e-7, err_msg=at)

  # The run saw what it pins: decays in every phase of the epoch, refreshes that moved the weights, a moving qbar.
  decay_steps = [s for s, e in enumerate(expected) if e[0]]
  assert decay_steps[:4] == [2, 5, 8, 11] and len(decay_steps) == STEPS // DECAY_EVERY
  assert {s % SPE for s in decay_steps} == set(range(SPE))
  assert refreshes_that_moved > 0.9 * (STEPS // SPE)
  assert np.abs(expected[-1][-1]).max() > 0
  # The documented difference from the reference: a counter restarted every epoch decays at other steps.
  per_epoch = simulate(STEPS, SPE, DECAY_EVERY, EST_EPOCH, 0.9, masks, targets, teacher_means,
                       restart_every_epoch=True)
  per_epoch_steps = [s for s, e in enumerate(per_epoch) if e[0]]
  assert per_epoch_steps[:4] == [2, 5, 9, 12] and per_epoch_steps != decay_steps


def test_objective_flags_the_warmup_by_epoch():
  """`Aux.after_warmup`, which gates the qbar update, is step // steps_per_epoch > ssl.est_epoch."""
  cfg = make_config()
  zeros = lambda n, d: jnp.zeros((n, d), jnp.float32)
  views = lambda d: objective.Views(zeros(2, d), zeros(U, d), zeros(U, d), zeros(U, d))
  semi = semi_state.init(C, D, K)
  flag = jax.jit(lambda step: objective.compute_objective(
      views(C), views(C), views(D), jnp.zeros((2,), jnp.int32), jnp.full((U,), -1, jnp.int32), semi, step, cfg,
      np.full(C, 1.0 / C))[2].after_warmup)
  for step in range(0, 12 * SPE):
    assert bool(flag(jnp.int32(step))) == (step // SPE > EST_EPOCH), step
