"""The FixMatch / ACR / SeMi objective on hand-made outputs against a numpy computation of the spec."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from semi_jax import memory_bank
from semi_jax.state import init_semi_state
from semi_jax.train_step import StepContext, compute_objective

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
  semi = init_semi_state(C, D, 4)
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
  ctx = StepContext(model=None, tx=None, config=cfg, class_prior=prior, mean=np.zeros(3), std=np.ones(3))
  batch = {"x": jnp.zeros((B, 8, 8, 3), jnp.uint8), "y": jnp.asarray(y),
           "u_weak": jnp.zeros((U, 8, 8, 3), jnp.uint8), "u_label": jnp.asarray(u_label)}
  fn = jax.jit(lambda lg, lb, f, s: compute_objective(lg, lb, f, batch, semi, s, ctx))
  total, out, aux = fn(jnp.asarray(logits), jnp.asarray(logits_b), jnp.asarray(feats), jnp.int32(step))
  expected, tgt, mask_ss = numpy_objective(logits, logits_b, feats, y, prior, semi, cfg, step)
  for k, v in expected.items():
    np.testing.assert_allclose(float(out[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(float(total), expected["loss"], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["target"]), tgt)
  np.testing.assert_array_equal(np.asarray(aux["mask_ss"]), mask_ss)
  # Diagnostics use the true labels, the loss does not: changing them leaves the loss unchanged.
  batch2 = dict(batch, u_label=jnp.asarray((u_label + 1) % C))
  total2, _, _ = compute_objective(jnp.asarray(logits), jnp.asarray(logits_b), jnp.asarray(feats), batch2, semi,
                                   jnp.int32(step), ctx)
  assert float(total2) == pytest.approx(float(total))


def test_fixmatch_loss_by_hand():
  """Two classes, one labeled and one unlabeled example, numbers worked out by hand."""
  cfg = make_config("fixmatch", threshold=0.9)
  logits = np.array([[2.0, 0.0],   # labeled, y=0: CE = log(1 + e^-2) = 0.126928
                     [4.0, 0.0],   # weak: p = 0.982014 >= 0.9 -> pseudo-label 0
                     [0.0, 1.0],   # strong 1: CE(class 0) = log(1 + e^1) = 1.313262
                     [1.0, 1.0]],  # strong 2: CE = log 2 = 0.693147
                    np.float32)
  ctx = StepContext(model=None, tx=None, config=cfg, class_prior=np.array([0.5, 0.5]), mean=np.zeros(3),
                    std=np.ones(3))
  batch = {"x": jnp.zeros((1, 8, 8, 3), jnp.uint8), "y": jnp.asarray([0]),
           "u_weak": jnp.zeros((1, 8, 8, 3), jnp.uint8), "u_label": jnp.asarray([0])}
  semi = init_semi_state(2, 3, 2)
  total, out, _ = compute_objective(jnp.asarray(logits), jnp.asarray(logits), jnp.zeros((4, 3)), batch, semi,
                                    jnp.int32(0), ctx)
  assert float(out["loss_x"]) == pytest.approx(0.126928, abs=1e-5)
  assert float(out["loss_u"]) == pytest.approx((1.313262 + 0.693147) / 2, abs=1e-5)
  assert float(total) == pytest.approx(0.126928 + 1.003205, abs=1e-5)
  assert float(out["mask_rate"]) == 1.0 and float(out["pseudo_label_acc"]) == 1.0
