"""The FixMatch / ACR / SeMi objective on hand-made outputs against a numpy computation of the spec, its
gradients (where the stop-gradients cut), and its small pieces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from semi_jax import memory_bank, objective, semi_state
from semi_jax.objective import Views, compute_objective

B, U, C, D = 4, 6, 3, 5


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ce(logits, labels):
  return -log_softmax(logits)[np.arange(len(labels)), labels]


def split(rows):
  """The rows of one output laid out as concat(x, u_w, u_s, u_s'), as the four groups."""
  rows = jnp.asarray(rows)
  return Views(rows[:B], rows[B:B + U], rows[B + U:B + 2 * U], rows[B + 2 * U:])


def make_case(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B + 3 * U, C)).astype(np.float32) * 3
  logits_b = rng.normal(size=(B + 3 * U, C)).astype(np.float32) * 3
  feats = rng.normal(size=(B + 3 * U, D)).astype(np.float32)
  y = rng.integers(0, C, B).astype(np.int32)
  u_label = rng.integers(-1, C, U).astype(np.int32)
  prior = np.array([0.6, 0.3, 0.1])
  return logits, logits_b, feats, y, u_label, prior


def make_config(algo, threshold=0.7):
  c = default.get_config(f"algo={algo}")
  c.train.steps_per_epoch = 10
  c.train.total_steps = 100
  c.ssl.est_epoch = 0
  c.ssl.threshold.value = threshold
  c.plce.ramp = default.schedule_config("linear", value=0.0, end_value=1.0)
  c.plce.alpha = 0.8
  return c


def make_semi_state(rng):
  semi = semi_state.init(C, D, 4)
  bank_feats = rng.normal(size=(C, 4, D)).astype(np.float32)
  conf = np.array([[0.99, 0.98, 0.9, 0.0], [0.97, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  filled = conf > 0
  bank = memory_bank.MemoryBank.from_ranked(bank_feats * filled[..., None], conf, filled, np.zeros((C, 4), bool))
  return semi.replace(bank=bank, class_weight=jnp.asarray([0.5, 0.3, 0.2], jnp.float32),
                      qbar=jnp.asarray(rng.normal(size=(D,)) * 0.1, jnp.float32))


def numpy_objective(logits, logits_b, feats, y, prior, semi, cfg, step):
  """Spec formulas, written plainly."""
  thr = cfg.ssl.threshold.value
  after = step // cfg.train.steps_per_epoch > cfg.ssl.est_epoch
  lx, luw, lus1, lus2 = logits[:B], logits[B:B + U], logits[B + U:B + 2 * U], logits[B + 2 * U:]
  fuw, fus1, fus2 = feats[B:B + U], feats[B + U:B + 2 * U], feats[B + 2 * U:]
  adj = lambda tau: np.log(prior ** tau + 1e-12)
  terms = {}
  terms["loss_x"] = ce(lx + (adj(cfg.ssl.tau2) if cfg.ssl.labeled_logit_adjust else 0), y).mean()
  p_t = softmax(luw)
  pl = p_t.copy()
  if cfg.plce.enabled and after:
    bank = jax.device_get(semi.bank)
    protos = np.zeros((C, D))
    has = bank.filled.any(1)
    for c in range(C):
      if has[c]:
        protos[c] = np.asarray(memory_bank.ranked_feats(bank))[c][bank.filled[c]].mean(0)
    dist = np.sqrt(((fus1[:, None] - protos[None]) ** 2).sum(-1))
    z = np.where(has[None], -dist / cfg.plce.tau_tar, -np.inf)
    tpc = softmax(z)
    ramp = step / cfg.train.total_steps
    w = cfg.plce.alpha * ramp * np.asarray(semi.class_weight)
    pl = (1 - w) * pl + w * tpc
    pl = pl / pl.sum(-1, keepdims=True)
  conf, tgt = pl.max(-1), pl.argmax(-1)
  mask_ss = (conf >= thr) | (p_t.max(-1) >= thr)
  if cfg.miner.enabled and after:
    q = np.clip(pl, 1e-8, 1 - 1e-8)
    ent = -(q * np.log(q)).sum(-1) / np.log(C)
    ohem = ent * cfg.miner.scale.value + 1 - cfg.miner.scale.value
  else:
    ohem = np.ones(U)
  terms["loss_u"] = np.concatenate([ce(lus1, tgt) * mask_ss * ohem, ce(lus2, tgt) * mask_ss * ohem]).mean()
  total = terms["loss_x"] + terms["loss_u"]
  if cfg.ssl.dual_head:
    bx, buw, bus1, bus2 = logits_b[:B], logits_b[B:B + U], logits_b[B + U:B + 2 * U], logits_b[B + 2 * U:]
    terms["loss_x_b"] = ce(bx + adj(cfg.ssl.tau2), y).mean()
    p_h2 = softmax(luw - adj(cfg.ssl.tau12))
    m_b = (p_h2.max(-1) >= thr) | (softmax(buw).max(-1) >= thr)
    t_h2 = p_h2.argmax(-1)
    terms["loss_u_b"] = np.concatenate([ce(bus1, t_h2) * m_b, ce(bus2, t_h2) * m_b]).mean()
    total += terms["loss_x_b"] + terms["loss_u_b"]
  if cfg.cons.enabled:
    if after:
      pt = cfg.cons.proto_t
      q_w = softmax((fuw - np.asarray(semi.qbar)) / (pt / 5))
      inv = ~mask_ss
      lc = np.concatenate([-(q_w * log_softmax(fus1 / pt)).sum(-1) * inv,
                           -(q_w * log_softmax(fus2 / pt)).sum(-1) * inv]).mean()
    else:
      lc = 0.0
    terms["loss_cons"] = lc
    total += cfg.cons.weight * lc
  terms["loss"] = total
  return terms, tgt, mask_ss


@pytest.mark.parametrize("algo", ["fixmatch", "fixmatch_la", "acr", "semi"])
@pytest.mark.parametrize("step", [5, 40])  # before / after the warm-up epoch
def test_objective_matches_numpy(algo, step):
  logits, logits_b, feats, y, u_label, prior = make_case(0)
  cfg = make_config(algo)
  rng = np.random.default_rng(1)
  semi = make_semi_state(rng)
  fn = jax.jit(lambda lg, lb, f, s: compute_objective(lg, lb, f, jnp.asarray(y), jnp.asarray(u_label), semi, s,
                                                      cfg, prior))
  total, out, aux = fn(split(logits), split(logits_b), split(feats), jnp.int32(step))
  expected, tgt, mask_ss = numpy_objective(logits, logits_b, feats, y, prior, semi, cfg, step)
  for k, v in expected.items():
    np.testing.assert_allclose(float(out[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(float(total), expected["loss"], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux.target), tgt)
  np.testing.assert_array_equal(np.asarray(aux.mask), mask_ss)
  # Diagnostics use the true labels, the loss does not: changing them leaves the loss unchanged.
  total2, _, _ = compute_objective(split(logits), split(logits_b), split(feats), jnp.asarray(y),
                                   jnp.asarray((u_label + 1) % C), semi, jnp.int32(step), cfg, prior)
  assert float(total2) == pytest.approx(float(total))


def test_fixmatch_loss_by_hand():
  """Two classes, one labeled and one unlabeled example, numbers worked out by hand."""
  cfg = make_config("fixmatch", threshold=0.9)
  logits = Views(jnp.asarray([[2.0, 0.0]]),   # labeled, y=0: CE = log(1 + e^-2) = 0.126928
                 jnp.asarray([[4.0, 0.0]]),   # weak: p = 0.982014 >= 0.9 -> pseudo-label 0
                 jnp.asarray([[0.0, 1.0]]),   # strong 1: CE(class 0) = log(1 + e^1) = 1.313262
                 jnp.asarray([[1.0, 1.0]]))   # strong 2: CE = log 2 = 0.693147
  feats = Views(*(jnp.zeros((1, 3)) for _ in range(4)))
  semi = semi_state.init(2, 3, 2)
  total, out, _ = compute_objective(logits, logits, feats, jnp.asarray([0]), jnp.asarray([0]), semi,
                                    jnp.int32(0), cfg, np.array([0.5, 0.5]))
  assert float(out["loss_x"]) == pytest.approx(0.126928, abs=1e-5)
  assert float(out["loss_u"]) == pytest.approx((1.313262 + 0.693147) / 2, abs=1e-5)
  assert float(total) == pytest.approx(0.126928 + 1.003205, abs=1e-5)
  assert float(out["mask_rate"]) == 1.0 and float(out["pseudo_label_acc"]) == 1.0


def numpy_cons_feature_grad(f_uw, f_us, qbar, unconfident, cfg):
  """d(cons.weight * Lcons) / d f(u_s) for one strong view: Lcons = mean_i w_i 0.5 (CE(t_i, f_i / pt) + ...)."""
  pt = cfg.cons.proto_t
  teacher = softmax((f_uw - qbar) / (pt / 5))
  return cfg.cons.weight * 0.5 * unconfident[:, None] / U * (softmax(f_us / pt) - teacher) / pt


@pytest.mark.parametrize("cons", [True, False])
def test_gradients_stop_where_the_spec_says(cons):
  """The pseudo-labels, the consistency teacher and the prototype targets are constants of the loss.

  Every part is on, after the warm-up, with prototypes in the bank (so PLCE mixes and the miner weighs) and both
  confident and unconfident rows. The weak view is only a teacher: no gradient reaches its rows of either head
  or of the features. The features are trained only by Lcons: the labeled rows get none, the strong rows get
  Lcons's gradient on the unconfident rows and nothing on the confident ones (nothing at all without Lcons).
  """
  logits, logits_b, feats, y, u_label, prior = make_case(0)
  cfg = make_config("semi", threshold=0.9)
  cfg.cons.enabled = cons
  step = 40  # epoch 4 > est_epoch 0; the PLCE ramp is at 0.4
  # Features, bank and centre scaled down so that neither the teacher softmax(. / (proto_t / 5)) nor the prototype
  # targets softmax(-distance / tau_tar) saturate: a gradient through them would be far from zero.
  scale = 0.05
  feats = feats * scale
  semi = make_semi_state(np.random.default_rng(1))
  semi = semi.replace(bank=semi.bank.replace(feats=semi.bank.feats * scale), qbar=semi.qbar * 0.2)

  def total_fn(lg, lb, f):
    total, metrics, aux = compute_objective(lg, lb, f, jnp.asarray(y), jnp.asarray(u_label), semi, jnp.int32(step),
                                            cfg, prior)
    return total, (metrics, aux)

  grads, (metrics, aux) = jax.jit(jax.grad(total_fn, argnums=(0, 1, 2), has_aux=True))(
      split(logits), split(logits_b), split(feats))
  g_logits, g_logits_b, g_feats = jax.tree.map(np.asarray, grads)
  confident = np.asarray(aux.mask)
  # The setting exercises every path the stop-gradients cut.
  assert 0 < confident.sum() < U
  teacher = softmax((feats[B:B + U] - np.asarray(semi.qbar)) / (cfg.cons.proto_t / 5))
  assert teacher.max(axis=-1).max() < 0.99
  protos, has_proto = memory_bank.prototypes(semi.bank)
  targets = objective.prototype_targets(jnp.asarray(feats[B + U:B + 2 * U]), protos, has_proto, cfg.plce.tau_tar)
  assert float(jnp.max(targets)) < 0.99
  assert float(metrics["plce_weight"]) > 0 and float(metrics["ohem_weight"]) != 1.0
  if cons:
    assert float(metrics["loss_cons"]) > 0
  # The trained rows do get gradients (so the zeros below are not an empty graph).
  for g in (g_logits.x, g_logits.u_strong1, g_logits.u_strong2, g_logits_b.x, g_logits_b.u_strong1,
            g_logits_b.u_strong2):
    assert np.abs(g).max() > 1e-4

  # The weak view is a teacher only.
  np.testing.assert_array_equal(g_logits.u_weak, 0.0, err_msg="logits of u_w")
  np.testing.assert_array_equal(g_logits_b.u_weak, 0.0, err_msg="balanced logits of u_w")
  np.testing.assert_array_equal(g_feats.u_weak, 0.0, err_msg="features of u_w (Lcons teacher)")
  # No loss term reads the labeled features.
  np.testing.assert_array_equal(g_feats.x, 0.0, err_msg="features of x")
  # The strong views' features: Lcons on the unconfident rows, nothing else (not PLCE's prototype targets, not the
  # miner's weights).
  for name, g in (("u_strong1", g_feats.u_strong1), ("u_strong2", g_feats.u_strong2)):
    np.testing.assert_array_equal(g[confident], 0.0, err_msg=f"features of {name}, confident rows")
    if not cons:
      np.testing.assert_array_equal(g, 0.0, err_msg=f"features of {name} without Lcons")
    else:
      assert (np.abs(g[~confident]).max(axis=-1) > 0).all(), name
      f_us = feats[B + U:B + 2 * U] if name == "u_strong1" else feats[B + 2 * U:]
      expected = numpy_cons_feature_grad(feats[B:B + U], f_us, np.asarray(semi.qbar), ~confident, cfg)
      np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7, err_msg=name)


def test_prototype_targets():
  feats = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
  protos = np.array([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]], np.float32)
  has = np.array([True, True, False])
  got = np.asarray(objective.prototype_targets(jnp.asarray(feats), jnp.asarray(protos), jnp.asarray(has), 1.0))
  # row 0: distances (0, 5) -> softmax(0, -5); class 2 has no prototype
  e = np.exp(-5.0)
  np.testing.assert_allclose(got[0], [1 / (1 + e), e / (1 + e), 0.0], rtol=1e-5)
  np.testing.assert_allclose(got[1], [e / (1 + e), 1 / (1 + e), 0.0], rtol=1e-5)
  empty = np.asarray(objective.prototype_targets(jnp.asarray(feats), jnp.zeros((3, 2)), jnp.zeros(3, bool), 1.0))
  np.testing.assert_allclose(empty, np.full((2, 3), 1 / 3), rtol=1e-6)


def test_interleave_rows_matches_reference_formula():
  x = np.arange(8 * 2).reshape(8, 2)
  size = 4  # reference: reshape([-1, size] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])
  expected = x.reshape(-1, size, 2).transpose(1, 0, 2).reshape(-1, 2)
  np.testing.assert_array_equal(np.asarray(objective.interleave_rows(jnp.asarray(x), size)), expected)
