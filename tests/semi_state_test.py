"""The SeMi state update (semi_jax/semi_state.py): the class-frequency monitor, and when `update` decays the bank,
refreshes the class weight and moves the consistency centre, against a plain-Python simulation of the loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from semi_jax import algorithms, memory_bank, objective, semi_state

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
    # The reference counts batch_idx within the epoch: its counter restarts at every epoch's first step.
    counter_start = max(last_decay, epoch * steps_per_epoch) if restart_every_epoch else last_decay
    decayed = step + 1 - counter_start >= interval
    if decayed:
      decays, last_decay = decays + 1, step + 1
    np.add.at(counts, targets[step][masks[step]], 1.0)
    refresh = epoch if step % steps_per_epoch == steps_per_epoch - 1 else None
    if epoch > est_epoch:
      qbar = np.float32(momentum) * qbar + np.float32(1.0 - momentum) * teacher_means[step]
    out.append((decayed, decays, last_decay, counts.copy(), refresh, qbar))
  return out


@pytest.mark.parametrize("clock", algorithms.DECAY_CLOCKS)
def test_update_timing_matches_the_loop_over_many_steps(clock):
  """1000 steps of `semi_state.update` (7 steps an epoch, a decay every 3 steps, warm-up to the end of epoch 5).

  - Bank decay at exactly the steps where (step + 1 - last decay) >= bank.decay_every, the counter restarting
    every epoch (bank.decay_clock=epoch, the reference's batch_idx) or not (global). The candidates are too weak
    to enter the full bank, so its confidences change only by decay: c0 * beta^decays.
  - The class weight changes only at the last step of an epoch, to monitor_class_weight(counts up to and
    including that step, epoch = step // steps_per_epoch).
  - qbar stays zero through the warm-up (step // steps_per_epoch <= ssl.est_epoch), then follows
    qbar <- m qbar + (1 - m) mean(teacher).
  """
  cfg = make_config()
  cfg.bank.decay_clock = clock
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
  expected = simulate(STEPS, SPE, DECAY_EVERY, EST_EPOCH, cfg.cons.center_momentum, masks, targets, teacher_means,
                      restart_every_epoch=clock == "epoch")
  df = cfg.ssl.monitor_df.value

  class_weight, conf, refreshes_that_moved = np.ones(C, np.float32), conf0, 0
  for step, (decayed, decays, last_decay, counts, refresh, qbar) in enumerate(expected):
    aux = objective.Aux(conf=weak, target=jnp.asarray(targets[step]), mask=jnp.asarray(masks[step]),
                        f_strong=(jnp.asarray(f_strong[0]), jnp.asarray(f_strong[1])),
                        teacher_mean=jnp.asarray(teacher_means[step]),
                        after_warmup=jnp.asarray(step // SPE > EST_EPOCH), u_label=jnp.full((U,), -1))
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
  if clock == "global":
    assert decay_steps[:4] == [2, 5, 8, 11] and len(decay_steps) == STEPS // DECAY_EVERY
    assert {s % SPE for s in decay_steps} == set(range(SPE))
  else:  # 7-step epochs: decays after steps 2 and 5 of each, never in the last partial interval
    assert decay_steps[:4] == [2, 5, 9, 12] and {s % SPE for s in decay_steps} == {2, 5}
  assert refreshes_that_moved > 0.9 * (STEPS // SPE)
  assert np.abs(expected[-1][-1]).max() > 0


@pytest.mark.parametrize("decay_every", [50, 200])
def test_epoch_clock_decays_where_the_reference_loop_does(decay_every):
  """Three 500-step epochs (cifar100_lt / imagenet127 use 200, cifar10_lt 100, the default 50): the steps after
  which the bank decays are those of the reference's `for batch_idx in range(eval_step): ... if (batch_idx + 1)
  % decay_step == 0`, and the global clock differs exactly when decay_every does not divide the epoch."""
  spe = 500
  reference = [epoch * spe + i for epoch in range(3) for i in range(spe) if (i + 1) % decay_every == 0]

  def decay_steps(clock):
    due = jax.jit(lambda step, last: semi_state.decay_due(step, last, decay_every, spe, clock))
    out, last = [], 0
    for step in range(3 * spe):
      if bool(due(jnp.int32(step), jnp.int32(last))):
        out.append(step)
        last = step + 1
    return out

  assert decay_steps("epoch") == reference
  assert len(reference) == 3 * (spe // decay_every)  # 200: twice an epoch, the last 100 steps never decay
  assert (decay_steps("global") == reference) == (spe % decay_every == 0)
  with pytest.raises(ValueError, match="bank.decay_clock"):
    semi_state.decay_due(0, 0, 2, spe, "nope")


def test_epoch_counts_restart_after_every_refresh():
  """plce.class_weight_counts=epoch: the weight refreshed at an epoch's end comes from that epoch's counts."""
  cfg = make_config()
  cfg.plce.class_weight_counts = "epoch"
  cfg.plce.class_weight = "frequency"
  semi = semi_state.init(C, D, K)
  zero = jnp.zeros((U, D), jnp.float32)
  rng = np.random.default_rng(1)
  epoch_counts = np.zeros(C)
  for step in range(2 * SPE):
    targets = rng.integers(0, C, U).astype(np.int32)
    aux = objective.Aux(conf=jnp.full((U,), 1e-30), target=jnp.asarray(targets), mask=jnp.ones((U,), bool),
                        f_strong=(zero, zero), teacher_mean=jnp.zeros((D,)), after_warmup=jnp.asarray(False),
                        u_label=jnp.asarray(targets))
    epoch_counts = (0 if step % SPE == 0 else epoch_counts) + np.bincount(targets, minlength=C)
    semi = semi_state.update(semi, aux, jnp.int32(step), cfg)[0]
    if step % SPE == SPE - 1:
      np.testing.assert_allclose(semi.class_weight, epoch_counts / epoch_counts.sum(), rtol=1e-6)
      np.testing.assert_array_equal(semi.label_counts, 0.0)
    else:
      np.testing.assert_array_equal(semi.label_counts, epoch_counts)


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
