"""Tests for semi_jax.schedules: hand-computed values per kind, warm-up, jit/vmap, errors, config shape."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from semi_jax import schedules
from semi_jax.schedules import make_schedule, schedule_config

ALL_KEYS = {
    "kind", "value", "end_value", "start_step", "steps", "rate", "every",
    "warmup_steps", "warmup_value", "cycles",
}


def _values(cfg, total_steps, steps, steps_per_epoch=None):
  fn = make_schedule(cfg, total_steps, steps_per_epoch)
  return [float(fn(s)) for s in steps]


# --- config shape --------------------------------------------------------------------------------------


def test_every_schedule_config_has_the_same_keys_and_types():
  configs = [schedule_config(kind=k) for k in schedules.KINDS]
  configs += [
      schedule_config("constant", value=0.95),
      schedule_config("linear", value=0, end_value=1, steps=5000),  # ints given for float fields
      schedule_config("reference_cosine", value=0.03, cycles=7 / 16, warmup_steps=10),
  ]
  reference_types = {k: type(v) for k, v in configs[0].items()}
  for cfg in configs:
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert set(cfg.keys()) == ALL_KEYS
    assert {k: type(v) for k, v in cfg.items()} == reference_types
  assert reference_types["value"] is float and reference_types["steps"] is int


def test_locked_config_switches_kind_and_accepts_int_for_float_fields():
  cfg = schedule_config("cosine", value=1.0, end_value=0.0, steps=100)
  cfg.lock()
  cfg.kind = "linear"
  cfg.value = 2  # ml_collections casts int -> float on float fields.
  assert isinstance(cfg.value, float)
  # linear 2 -> 0 over 100 steps: step 25 = 2 - 2 * 25/100 = 1.5
  assert _values(cfg, 100, [25]) == pytest.approx([1.5])
  with pytest.raises(AttributeError):
    cfg.typo = 1


# --- values of each kind ---------------------------------------------------------------------------------


def test_constant():
  assert _values(schedule_config("constant", value=-3.5), 10, [0, 5, 10, 50]) == [-3.5] * 4


def test_linear_whole_training():
  cfg = schedule_config("linear", value=0.0, end_value=1.0, steps=1000)
  # step 250 of a 1000-step linear 0 -> 1 is 250/1000 = 0.25; the end value holds after step 1000.
  assert _values(cfg, 1000, [0, 250, 500, 1000, 1500]) == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0])


def test_linear_window_boundaries():
  cfg = schedule_config("linear", value=2.0, end_value=-2.0, start_step=100, steps=400)
  # before 100: 2; at 100: 2; step 300: 2 + (-4) * (300-100)/400 = 0; step 500 = end -2; after: -2.
  got = _values(cfg, 1000, [0, 99, 100, 300, 400, 500, 900])
  assert got == pytest.approx([2.0, 2.0, 2.0, 0.0, -1.0, -2.0, -2.0])


def test_steps_zero_means_until_the_end_of_training():
  cfg = schedule_config("linear", value=0.0, end_value=1.0, start_step=200, steps=0)
  # window 200..1000 (800 steps): step 600 = (600-200)/800 = 0.5; step 1000 = 1.
  assert _values(cfg, 1000, [200, 600, 999, 1000]) == pytest.approx([0.0, 0.5, 799 / 800, 1.0])
  cos_cfg = schedule_config("cosine", value=1.0, end_value=0.0, start_step=0, steps=0)
  # half-way through a 400-step run: 0.5 * (1 + cos(pi/2)) = 0.5.
  assert _values(cos_cfg, 400, [200, 400]) == pytest.approx([0.5, 0.0], abs=1e-6)


def test_cosine():
  cfg = schedule_config("cosine", value=1.0, end_value=0.1, start_step=100, steps=1000)
  # step 350: progress (350-100)/1000 = 0.25 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/4)) = 0.86819805...
  at_350 = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
  assert at_350 == pytest.approx(0.8681980515)
  # step 600: progress 0.5 -> 0.1 + 0.45 = 0.55; step 1100: end 0.1.
  got = _values(cfg, 2000, [0, 100, 350, 600, 1100, 2000])
  assert got == pytest.approx([1.0, 1.0, at_350, 0.55, 0.1, 0.1], abs=1e-6)


def test_exponential():
  cfg = schedule_config("exponential", value=2.0, rate=0.5, every=100, start_step=50)
  # before 50: 2; step 100: 2 * 0.5**(50/100) = sqrt(2); step 150: 2 * 0.5 = 1;
  # step 450: 2 * 0.5**((450-50)/100) = 2 * 0.5**4 = 0.125.
  got = _values(cfg, 1000, [0, 49, 50, 100, 150, 450])
  assert got == pytest.approx([2.0, 2.0, 2.0, math.sqrt(2.0), 1.0, 0.125], rel=1e-6)


def test_step_staircase():
  cfg = schedule_config("step", value=1.0, rate=0.1, every=100, start_step=0)
  # floor(99/100) = 0 -> 1; floor(100/100) = 1 -> 0.1; floor(250/100) = 2 -> 0.01.
  assert _values(cfg, 1000, [0, 99, 100, 199, 250]) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01], rel=1e-6)
  memory_decay = schedule_config("step", value=1.0, rate=0.99, every=50, start_step=10)
  # before 10: 1; step 59: floor(49/50) = 0 -> 1; step 60: 0.99; step 210: floor(200/50) = 4 -> 0.99**4.
  got = _values(memory_decay, 1000, [5, 59, 60, 210])
  assert got == pytest.approx([1.0, 1.0, 0.99, 0.99**4], rel=1e-6)


def test_reference_cosine_matches_the_fixmatch_lr_formula():
  total = 250_000
  cfg = schedule_config("reference_cosine", value=1.0, cycles=7 / 16)
  steps = [0, 1, 1000, 62_500, 125_000, 249_999, 250_000]
  expected = [math.cos(7 * math.pi * k / (16 * total)) for k in steps]
  assert _values(cfg, total, steps) == pytest.approx(expected, rel=1e-6, abs=1e-7)
  lr = schedule_config("reference_cosine", value=0.03, cycles=7 / 16)
  # at the last step: 0.03 * cos(7 pi / 16) = 0.03 * 0.19509... = 0.0058527...
  assert _values(lr, total, [total]) == pytest.approx([0.03 * 0.19509032201612825], rel=1e-6)


def _reference_lr_lambda(step, warmup, total, cycles=7 / 16):
  """Plain-Python form of the reference's LambdaLR factor (warm-up, then clamped cosine)."""
  if step < warmup:
    return step / max(1, warmup)
  progress = (step - warmup) / max(1, total - warmup)
  return max(0.0, math.cos(math.pi * cycles * progress))


def test_reference_cosine_warmup_is_the_references_own():
  total, warmup = 1000, 100
  cfg = schedule_config("reference_cosine", value=0.03, cycles=7 / 16, warmup_steps=warmup)
  steps = [0, 1, 50, 99, 100, 550, 999, 1000]
  expected = [0.03 * _reference_lr_lambda(k, warmup, total) for k in steps]
  # spot checks of that formula: step 50 -> 50/100; step 550 -> cos(7 pi/16 * 450/900) = cos(7 pi / 32).
  assert expected[2] == pytest.approx(0.03 * 0.5)
  assert expected[5] == pytest.approx(0.03 * math.cos(7 * math.pi / 32))
  assert _values(cfg, total, steps) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_reference_cosine_horizon_and_clamp_at_zero():
  # horizon 700 in a 1000-step run, cycles 1/2: step 350 -> cos(pi/4); past the horizon the progress keeps
  # growing (1000/700 -> cos(pi/2 * 1.43) < 0) and the factor is clamped at 0 as in the reference.
  cfg = schedule_config("reference_cosine", value=1.0, cycles=0.5, steps=700)
  got = _values(cfg, 1000, [350, 700, 1000])
  assert got == pytest.approx([math.cos(math.pi / 4), 0.0, 0.0], abs=1e-6)


def test_reference_ramp_reproduces_epoch_over_eval_step():
  cfg = schedule_config("reference_ramp", value=1.0)
  # epoch = step // 500; value * epoch / 500: step 499 -> 0; 500 -> 1/500; 1250 -> 2/500; 249999 -> 499/500.
  got = _values(cfg, 250_000, [0, 499, 500, 1250, 249_999], steps_per_epoch=500)
  assert got == pytest.approx([0.0, 0.0, 1 / 500, 2 / 500, 499 / 500], rel=1e-6)
  alpha = schedule_config("reference_ramp", value=0.5)
  assert _values(alpha, 100, [30, 99], steps_per_epoch=10) == pytest.approx([0.5 * 3 / 10, 0.5 * 9 / 10])


# --- warm-up -------------------------------------------------------------------------------------------


def test_warmup_goes_linearly_to_the_schedules_value_at_its_end():
  cfg = schedule_config("linear", value=1.0, end_value=0.0, steps=1000, warmup_steps=100, warmup_value=0.0)
  # the linear schedule at step 100 is 1 - 100/1000 = 0.9; half-way through the warm-up: 0.9 * 50/100 = 0.45;
  # after the warm-up the schedule itself: step 200 -> 1 - 200/1000 = 0.8.
  got = _values(cfg, 1000, [0, 50, 99, 100, 200])
  assert got == pytest.approx([0.0, 0.45, 0.9 * 0.99, 0.9, 0.8], rel=1e-6)


def test_warmup_from_a_nonzero_value_for_constant_and_step():
  const = schedule_config("constant", value=0.95, warmup_steps=10, warmup_value=0.5)
  # step 5: 0.5 + (0.95 - 0.5) * 5/10 = 0.725.
  assert _values(const, 100, [0, 5, 10, 11]) == pytest.approx([0.5, 0.725, 0.95, 0.95])
  stair = schedule_config("step", value=1.0, rate=0.5, every=10, warmup_steps=20, warmup_value=1.0)
  # the staircase at step 20 is 0.5**2 = 0.25; step 10 of the warm-up: 1 + (0.25 - 1) * 10/20 = 0.625.
  assert _values(stair, 100, [0, 10, 20, 30]) == pytest.approx([1.0, 0.625, 0.25, 0.125])


def test_warmup_with_delayed_cosine_like_optax():
  cfg = schedule_config("cosine", value=1.0, end_value=0.0, start_step=100, steps=0, warmup_steps=100)
  got = _values(cfg, 500, [0, 25, 100, 300, 500])
  # warm-up 0 -> 1 over 100 steps, then a cosine over the 400 remaining steps: step 300 -> 0.5.
  assert got == pytest.approx([0.0, 0.25, 1.0, 0.5, 0.0], abs=1e-6)


# --- plain-Python oracle, jit and vmap -----------------------------------------------------------------


def _python_schedule(cfg, total, step, spe=None):
  """Branchy scalar re-implementation of every kind, used as an oracle for the jnp version."""
  kind, v, e, start = cfg.kind, cfg.value, cfg.end_value, cfg.start_step
  n = cfg.steps or total - start

  def base(s):
    if kind == "constant":
      return v
    if kind in ("linear", "cosine"):
      if s <= start:
        return v
      if s >= start + n:
        return e
      p = (s - start) / n
      return v + (e - v) * p if kind == "linear" else e + (v - e) * 0.5 * (1 + math.cos(math.pi * p))
    if kind in ("exponential", "step"):
      if s < start:
        return v
      k = (s - start) / cfg.every
      return v * cfg.rate ** (math.floor(k) if kind == "step" else k)
    if kind == "reference_cosine":
      w = cfg.warmup_steps
      return v * max(0.0, math.cos(math.pi * cfg.cycles * (s - w) / (n - w)))
    return v * (s // spe) / spe

  w = cfg.warmup_steps
  if w and step < w:
    return cfg.warmup_value + (base(w) - cfg.warmup_value) * step / w
  return base(step)


ORACLE_CONFIGS = [
    schedule_config("constant", value=0.95),
    schedule_config("linear", value=0.0, end_value=1.0, start_step=37, steps=500),
    schedule_config("cosine", value=0.5, end_value=0.01, start_step=0, steps=0, warmup_steps=64),
    schedule_config("exponential", value=1.0, rate=0.99, every=50, start_step=10),
    schedule_config("step", value=0.03, rate=0.2, every=300, warmup_steps=30, warmup_value=0.001),
    schedule_config("reference_cosine", value=0.03, cycles=7 / 16, warmup_steps=40),
    schedule_config("reference_ramp", value=1.0, warmup_steps=5, warmup_value=0.2),
]
ORACLE_STEPS = [0, 1, 4, 5, 36, 37, 38, 39, 40, 63, 64, 100, 299, 300, 537, 600, 999, 1000, 1001]


@pytest.mark.parametrize("cfg", ORACLE_CONFIGS, ids=[c.kind for c in ORACLE_CONFIGS])
def test_eager_jit_and_oracle_agree(cfg):
  total, spe = 1000, 100
  fn = make_schedule(cfg, total, spe)
  jitted = jax.jit(fn)
  for step in ORACLE_STEPS:
    expected = _python_schedule(cfg, total, step, spe)
    eager = fn(step)
    traced = jitted(jnp.int32(step))
    assert eager.dtype == jnp.float32 and eager.shape == ()
    assert traced.dtype == jnp.float32 and traced.shape == ()
    assert float(eager) == pytest.approx(expected, rel=2e-6, abs=1e-7), step
    assert float(traced) == pytest.approx(float(eager), rel=2e-6, abs=1e-7), step
    assert float(fn(np.int64(step))) == float(eager)


@pytest.mark.parametrize("cfg", ORACLE_CONFIGS, ids=[c.kind for c in ORACLE_CONFIGS])
def test_vmap_and_sample_match_scalar_evaluation(cfg):
  total, spe = 1000, 100
  fn = make_schedule(cfg, total, spe)
  steps = jnp.asarray(ORACLE_STEPS, jnp.int32)
  scalar = np.array([float(fn(int(s))) for s in ORACLE_STEPS], np.float32)
  vmapped = jax.jit(jax.vmap(fn))(steps)
  assert vmapped.shape == (len(ORACLE_STEPS),) and vmapped.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(vmapped), scalar, rtol=2e-6, atol=1e-7)
  sampled = schedules.sample(cfg, total, spe, ORACLE_STEPS)
  assert isinstance(sampled, np.ndarray) and sampled.dtype == np.float32
  np.testing.assert_allclose(sampled, scalar, rtol=2e-6, atol=1e-7)


def test_schedule_inside_a_jitted_step_with_a_traced_counter():
  lr = make_schedule(schedule_config("reference_cosine", value=0.03, cycles=7 / 16), 100)

  @jax.jit
  def update(count, param):
    return count + 1, param - lr(count)

  count, param = jnp.int32(0), jnp.float32(0.0)
  for _ in range(3):
    count, param = update(count, param)
  expected = -sum(0.03 * math.cos(7 * math.pi * k / (16 * 100)) for k in range(3))
  assert float(param) == pytest.approx(expected, rel=1e-6)


def test_sample_rejects_non_integer_points():
  cfg = schedule_config("constant", value=1.0)
  np.testing.assert_array_equal(schedules.sample(cfg, 10, None, [0.0, 3.0]), [1.0, 1.0])
  with pytest.raises(ValueError, match="integer"):
    schedules.sample(cfg, 10, None, [0.5])
  with pytest.raises(ValueError, match=r"\[0,"):
    schedules.sample(cfg, 10, None, [-1])


# --- describe / is_constant ------------------------------------------------------------------------------


def test_describe():
  assert schedules.describe(schedule_config("linear", value=0.0, end_value=1.0, steps=5000)) == (
      "linear 0.0→1.0 over steps 0..5000"
  )
  assert schedules.describe(schedule_config("cosine", value=1.0, end_value=0.0, start_step=10)) == (
      "cosine 1.0→0.0 over steps 10..end"
  )
  assert schedules.describe(schedule_config("constant", value=0.95)) == "constant 0.95"
  assert schedules.describe(schedule_config("step", value=1.0, rate=0.99, every=50)) == (
      "step 1.0 * 0.99^floor((step-0)/50) from step 0"
  )
  lr = schedule_config("reference_cosine", value=0.03, cycles=7 / 16, warmup_steps=5)
  assert schedules.describe(lr) == (
      "reference_cosine 0.03 * max(0, cos(pi*0.4375*progress)) over steps 0..end, "
      "warm-up from 0.0 over 5 steps"
  )
  ramp = schedules.describe(schedule_config("reference_ramp", value=1.0))
  assert ramp.startswith("reference_ramp") and "steps_per_epoch" in ramp
  assert "exponential" in schedules.describe(schedule_config("exponential", rate=0.5))


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (schedule_config("constant", value=3.0), True),
        (schedule_config("constant", value=3.0, warmup_steps=10, warmup_value=0.0), False),
        (schedule_config("constant", value=3.0, warmup_steps=10, warmup_value=3.0), True),
        (schedule_config("linear", value=1.0, end_value=1.0), True),
        (schedule_config("linear", value=1.0, end_value=0.0), False),
        (schedule_config("cosine", value=1.0, end_value=0.5), False),
        (schedule_config("exponential", value=0.5, rate=1.0), True),
        (schedule_config("step", value=0.5, rate=0.9), False),
        (schedule_config("reference_cosine", value=0.03), False),
        (schedule_config("reference_ramp", value=0.0), True),
        (schedule_config("reference_ramp", value=1.0), False),
    ],
)
def test_is_constant_agrees_with_sampled_values(cfg, expected):
  assert schedules.is_constant(cfg) is expected
  values = schedules.sample(cfg, 1000, 100, np.arange(0, 1001, 7))
  assert bool(np.all(values == cfg.value)) is expected


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="cosin"), "'kind' = 'cosin'"),
        (dict(kind="linear", steps=-5), "'steps' = -5"),
        (dict(kind="step", every=0), "'every' = 0"),
        (dict(start_step=-1), "'start_step' = -1"),
        (dict(warmup_steps=-3), "'warmup_steps' = -3"),
        (dict(kind="exponential", rate=-0.5), "'rate' = -0.5"),
        (dict(cycles=0.0), "'cycles' = 0.0"),
        (dict(value=float("nan")), "'value' = nan"),
        (dict(steps=2.5), "'steps' = 2.5"),
        (dict(every=True), "'every' = True"),
    ],
)
def test_bad_fields_are_rejected_by_name(kwargs, field):
  with pytest.raises(ValueError, match=r"allowed") as err:
    schedule_config(**kwargs)
  assert field in str(err.value)
  # make_schedule checks again: a config may have been edited (or written as a plain mapping) since.
  edited = dict(schedule_config().to_dict(), **kwargs)
  with pytest.raises(ValueError, match=r"allowed") as err:
    make_schedule(edited, 100)
  assert field in str(err.value)


def test_unknown_kind_lists_the_allowed_kinds():
  with pytest.raises(ValueError) as err:
    schedule_config(kind="poly")
  for kind in schedules.KINDS:
    assert kind in str(err.value)


def test_errors_that_depend_on_the_run_length():
  with pytest.raises(ValueError, match="'start_step' = 100 .* total_steps = 100"):
    make_schedule(schedule_config("linear", start_step=100, steps=0), 100)
  make_schedule(schedule_config("linear", start_step=100, steps=10), 100)  # explicit window: fine
  with pytest.raises(ValueError, match="'warmup_steps' = 200 exceeds total_steps = 100"):
    make_schedule(schedule_config("constant", warmup_steps=200), 100)
  with pytest.raises(ValueError, match="'warmup_steps' = 100 must be < the reference_cosine horizon 100"):
    make_schedule(schedule_config("reference_cosine", warmup_steps=100), 100)
  with pytest.raises(ValueError, match="'start_step' = 5 .* 'reference_cosine'"):
    make_schedule(schedule_config("reference_cosine", start_step=5), 100)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    make_schedule(schedule_config("reference_ramp"), 100)
  with pytest.raises(ValueError, match="total_steps = 0"):
    make_schedule(schedule_config("constant", value=1.0), 0)
  with pytest.raises(ValueError, match="steps_per_epoch = 0"):
    make_schedule(schedule_config("reference_ramp"), 100, steps_per_epoch=0)


def test_config_with_wrong_keys_is_rejected():
  with pytest.raises(ValueError, match=r"missing \['cycles'\]"):
    make_schedule({k: v for k, v in schedule_config().items() if k != "cycles"}, 10)
  extra = dict(schedule_config().items(), decay=0.9)
  with pytest.raises(ValueError, match=r"unexpected \['decay'\]"):
    schedules.describe(extra)
