"""Step-indexed schedules for every annealed hyper-parameter (LR, decays, ramps, thresholds).

A schedule is described by a `ml_collections.ConfigDict` with one fixed key set (see `schedule_config`),
whatever its kind, so locked configs can switch kind from the command line
(`--config.ssl.threshold.kind=linear`). `make_schedule` turns it into a pure function of the integer
training step. The function uses jnp only and no Python branching on the step, so it works eagerly on
Python/numpy ints, under `jax.jit` on a traced int32 step, under `jax.vmap`, and elementwise on an array of
steps; it always returns float32.

Each kind reads only the keys it needs and ignores the others (switching kind must not force resetting
unrelated keys):

  kind              formula (s = step, S = start_step)              keys read
  constant          value                                           value
  linear            value -> end_value linearly over [S, S + steps] value end_value start_step steps
  cosine            end + (value-end) * 0.5 * (1 + cos(pi * prog))  value end_value start_step steps
  exponential       value * rate ** ((s - S) / every) for s >= S    value rate every start_step
  step              value * rate ** floor((s - S) / every), s >= S  value rate every start_step
  reference_cosine  value * max(0, cos(pi * cycles * (s-W)/(H-W)))  value cycles steps (+ warm-up W)
  reference_ramp    value * (s // steps_per_epoch) / steps_per_epoch value

linear/cosine hold `value` before start_step and `end_value` after the window. `steps == 0` means "until
the end of training" (steps = total_steps - start_step). `reference_cosine` is the SeMi/FixMatch learning
rate factor (`cycles` = 7/16 there) with horizon H = steps (or total_steps when 0) and its own warm-up W;
past H its progress is not clipped, only the cosine is clamped at 0, as in the reference.
`reference_ramp` reproduces the reference's prototype-mixing ramp `epoch / eval_step`, which divides an epoch
count by the steps per epoch (a likely bug kept as an option, not a default).

Warm-up (any kind, `warmup_steps` W > 0): for s < W the value goes linearly from `warmup_value` to the
schedule's own value at step W; from W on it is the schedule. The warm-up overlays the schedule (the
schedule is not shifted): set start_step = W to begin a decay after the warm-up, like
`optax.warmup_cosine_decay_schedule`. For `reference_cosine` the cosine is measured from W, so with
warmup_value 0 the warm-up factor is s / W exactly as in the reference.

The step is converted to float32, which represents it exactly below 2**24 (16.7M steps).
"""
from collections.abc import Callable, Mapping
import math
import numbers

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np

KINDS = (
    "constant",
    "linear",
    "cosine",
    "exponential",
    "step",
    "reference_cosine",
    "reference_ramp",
)

# The one key set of every schedule config, with its Python type (fixed so locked configs type-check).
FIELD_TYPES = {
    "kind": str,
    "value": float,
    "end_value": float,
    "start_step": int,
    "steps": int,
    "rate": float,
    "every": int,
    "warmup_steps": int,
    "warmup_value": float,
    "cycles": float,
}

Schedule = Callable[[object], jnp.ndarray]


def schedule_config(
    kind: str = "constant",
    value: float = 1.0,
    end_value: float = 0.0,
    start_step: int = 0,
    steps: int = 0,
    rate: float = 1.0,
    every: int = 1,
    warmup_steps: int = 0,
    warmup_value: float = 0.0,
    cycles: float = 0.5,
) -> ml_collections.ConfigDict:
  """Returns a schedule ConfigDict; every kind has exactly these keys (and types).

  Args:
    kind: one of KINDS (see the module docstring for each formula).
    value: the value at the start (constant: the value; exponential/step/ramp: the multiplier).
    end_value: the value at the end of a linear or cosine schedule.
    start_step: step at which linear/cosine/exponential/step start changing (value before it).
    steps: length of the linear/cosine window, or reference_cosine's horizon; 0 = until the end of training.
    rate: decay factor of exponential/step per `every` steps (e.g. 0.99); > 1 grows.
    every: interval in steps of exponential/step decay (>= 1).
    warmup_steps: length of the linear warm-up for any kind; 0 = no warm-up.
    warmup_value: value at step 0 of the warm-up.
    cycles: cosine cycles of reference_cosine; 0.5 reaches exactly 0 at the horizon, the SeMi/FixMatch LR
      uses 7/16.
  """
  cfg = ml_collections.ConfigDict()
  cfg.kind = str(kind)
  cfg.value = _as_float("value", value)
  cfg.end_value = _as_float("end_value", end_value)
  cfg.start_step = _as_int("start_step", start_step)
  cfg.steps = _as_int("steps", steps)
  cfg.rate = _as_float("rate", rate)
  cfg.every = _as_int("every", every)
  cfg.warmup_steps = _as_int("warmup_steps", warmup_steps)
  cfg.warmup_value = _as_float("warmup_value", warmup_value)
  cfg.cycles = _as_float("cycles", cycles)
  _validate(cfg)
  return cfg


def make_schedule(cfg: Mapping, total_steps: int, steps_per_epoch: int | None = None) -> Schedule:
  """Builds `step -> float32 scalar` from a schedule config: its `ScheduleArrays` (see `as_arrays`).

  Args:
    cfg: a config from `schedule_config` (or a mapping with the same keys).
    total_steps: number of training steps; resolves `steps == 0` ("until the end of training").
    steps_per_epoch: steps per epoch; required by `reference_ramp` only.

  Returns:
    A pure jnp function of the step (int or int array, concrete or traced).
  """
  return as_arrays(cfg, total_steps, steps_per_epoch)


@flax.struct.dataclass
class ScheduleArrays:
  """A schedule as numbers: the constants of its formula, with the kind an index into KINDS. Calling it evaluates
  the schedule at a step.

  Every kind's formula is written once (`_FORMULAS`). Made by `as_arrays` from a config, the fields are numpy
  scalars, constants of the program: the one formula of the kind is evaluated. The same object with traced fields
  (runs trained together, stacked on a leading run axis and `jax.vmap`-ed; see semi_jax.hyperparams) evaluates
  every kind's formula and selects the run's, so runs whose schedules differ, in kind too, are one program. The
  constants are computed from the config on the host in float64, as Python does, and rounded to float32 once.
  """
  kind: jnp.ndarray  # int32 index into KINDS
  value: jnp.ndarray
  end: jnp.ndarray  # end_value
  delta: jnp.ndarray  # linear: end - value
  half_span: jnp.ndarray  # cosine: (value - end) * 0.5
  start: jnp.ndarray  # start_step (reference_cosine: its warm-up)
  steps: jnp.ndarray  # linear/cosine window, resolved; reference_cosine: horizon - warm-up
  rate: jnp.ndarray
  every: jnp.ndarray
  pi_cycles: jnp.ndarray  # reference_cosine: pi * cycles
  steps_per_epoch: jnp.ndarray  # reference_ramp
  warmup_steps: jnp.ndarray
  warmup_value: jnp.ndarray

  def __call__(self, step):
    s = _steps_to_float(step)
    if is_static(self.warmup_steps) and float(self.warmup_steps) == 0.0:
      return self.base(s).astype(jnp.float32)
    target = self.base(jnp.full_like(s, self.warmup_steps))
    ramp = self.warmup_value + (target - self.warmup_value) * (s / self.warmup_steps)
    # warmup_steps 0 (traced): s < 0 never holds, and the ramp's 0/0 is never selected.
    return jnp.where(s < self.warmup_steps, ramp, self.base(s)).astype(jnp.float32)

  def base(self, s):
    """The schedule without its warm-up at the float steps `s`."""
    if is_static(self.kind):
      return _FORMULAS[KINDS[int(self.kind)]](self, s)
    return jnp.select([self.kind == i for i in range(len(KINDS))], [_FORMULAS[k](self, s) for k in KINDS])


def is_static(x) -> bool:
  """Whether a number is a constant of the program (a Python or numpy value), not a traced input."""
  return isinstance(x, (int, float, np.generic, np.ndarray))


def _progress(p: ScheduleArrays, s):
  return jnp.clip((s - p.start) / p.steps, 0.0, 1.0)


def _exponent(p: ScheduleArrays, s):
  # Clamped at 0 so that steps before start_step give exactly `value` (and 0**negative never appears).
  return jnp.maximum(s - p.start, 0.0) / p.every


# One formula per kind (see the module docstring); p holds the constants `as_arrays` derives from the config.
_FORMULAS = {
    "constant": lambda p, s: jnp.full(jnp.shape(s), p.value, jnp.float32),
    "linear": lambda p, s: p.value + p.delta * _progress(p, s),
    "cosine": lambda p, s: p.end + p.half_span * (1.0 + jnp.cos(jnp.pi * _progress(p, s))),
    "exponential": lambda p, s: p.value * jnp.power(p.rate, _exponent(p, s)),
    "step": lambda p, s: p.value * jnp.power(p.rate, jnp.floor(_exponent(p, s))),
    # Past the horizon the progress is not clipped, only the cosine is clamped at 0, as in the reference.
    "reference_cosine": lambda p, s: p.value * jnp.maximum(0.0, jnp.cos(p.pi_cycles * ((s - p.start) / p.steps))),
    # The reference's epoch / eval_step with epoch = step // eval_step.
    "reference_ramp": lambda p, s: p.value * jnp.floor(s / p.steps_per_epoch) / p.steps_per_epoch,
}
assert tuple(_FORMULAS) == KINDS


def as_arrays(cfg: Mapping, total_steps: int, steps_per_epoch: int | None = None) -> ScheduleArrays:
  """The schedule of `cfg` over `total_steps` as a `ScheduleArrays` of numpy scalars, after checking that it fits
  the run (ValueError naming the field otherwise)."""
  _validate(cfg)
  total_steps = _positive_int_arg("total_steps", total_steps)
  if steps_per_epoch is not None:
    steps_per_epoch = _positive_int_arg("steps_per_epoch", steps_per_epoch)
  kind = cfg["kind"]
  warmup_steps = int(cfg["warmup_steps"])
  if warmup_steps > total_steps:
    raise ValueError(
        f"schedule field 'warmup_steps' = {warmup_steps} exceeds total_steps = {total_steps}: the "
        f"warm-up must fit in training; use 0 <= warmup_steps <= {total_steps}."
    )
  value, end, start = float(cfg["value"]), float(cfg["end_value"]), int(cfg["start_step"])
  steps = _resolve_steps(cfg, total_steps, start) if kind in ("linear", "cosine") else max(int(cfg["steps"]), 1)
  if kind == "reference_cosine":
    if start != 0:
      raise ValueError(
          f"schedule field 'start_step' = {start} is not supported by kind 'reference_cosine', which starts at "
          "step 0 like the reference; use 0 (delay with warmup_steps) or kind 'cosine'."
      )
    horizon = _resolve_steps(cfg, total_steps, 0)
    if warmup_steps >= horizon:
      raise ValueError(
          f"schedule field 'warmup_steps' = {warmup_steps} must be < the reference_cosine horizon {horizon} "
          "(steps, or total_steps when steps = 0)."
      )
    start, steps = warmup_steps, horizon - warmup_steps
  if kind == "reference_ramp" and steps_per_epoch is None:
    raise ValueError(
        "schedule kind 'reference_ramp' needs steps_per_epoch (the reference's eval_step), got None: "
        "pass make_schedule(cfg, total_steps, steps_per_epoch=...)."
    )
  f32 = np.float32
  return ScheduleArrays(
      kind=np.int32(KINDS.index(kind)), value=f32(value), end=f32(end), delta=f32(end - value),
      half_span=f32((value - end) * 0.5), start=f32(start), steps=f32(steps), rate=f32(cfg["rate"]),
      every=f32(cfg["every"]), pi_cycles=f32(math.pi * float(cfg["cycles"])),
      steps_per_epoch=f32(steps_per_epoch or 1), warmup_steps=f32(warmup_steps),
      warmup_value=f32(cfg["warmup_value"]))


def sample(cfg: Mapping, total_steps: int, steps_per_epoch: int | None, points) -> np.ndarray:
  """Evaluates the schedule at the integer steps `points`; returns a float32 numpy array of their shape."""
  points = np.asarray(points)
  if points.dtype.kind == "f":
    if not np.all(np.isfinite(points)) or np.any(points != np.round(points)):
      raise ValueError(f"sample points must be integer steps, got {points!r}.")
  elif points.dtype.kind not in "iu":
    raise ValueError(f"sample points must be integer steps, got dtype {points.dtype}.")
  if points.size and (points.min() < 0 or points.max() > np.iinfo(np.int32).max):
    raise ValueError(
        f"sample points must lie in [0, {np.iinfo(np.int32).max}], got {points.min()}..{points.max()}."
    )
  fn = make_schedule(cfg, total_steps, steps_per_epoch)
  return np.asarray(fn(jnp.asarray(points.astype(np.int32))), dtype=np.float32)


def is_constant(cfg: Mapping) -> bool:
  """True when the schedule takes the same value at every step; that value is then `cfg.value`."""
  _validate(cfg)
  kind = cfg["kind"]
  value = cfg["value"]
  if kind == "constant":
    flat = True
  elif kind in ("linear", "cosine"):
    flat = cfg["end_value"] == value
  elif kind in ("exponential", "step"):
    flat = cfg["rate"] == 1.0 or value == 0.0
  else:  # reference_cosine and reference_ramp are multiples of value with a varying factor.
    flat = value == 0.0
  return flat and (cfg["warmup_steps"] == 0 or cfg["warmup_value"] == value)


def describe(cfg: Mapping) -> str:
  """A one-line formula of the schedule for logs and reports."""
  _validate(cfg)
  kind = cfg["kind"]
  v, e = _fmt(cfg["value"]), _fmt(cfg["end_value"])
  start, steps, every = cfg["start_step"], cfg["steps"], cfg["every"]
  window_end = "end" if steps == 0 else str(start + steps)
  if kind == "constant":
    text = f"constant {v}"
  elif kind in ("linear", "cosine"):
    text = f"{kind} {v}→{e} over steps {start}..{window_end}"
  elif kind == "exponential":
    text = f"exponential {v} * {_fmt(cfg['rate'])}^((step-{start})/{every}) from step {start}"
  elif kind == "step":
    text = f"step {v} * {_fmt(cfg['rate'])}^floor((step-{start})/{every}) from step {start}"
  elif kind == "reference_cosine":
    horizon = "end" if steps == 0 else str(steps)
    cycles = _fmt(cfg["cycles"])
    text = f"reference_cosine {v} * max(0, cos(pi*{cycles}*progress)) over steps 0..{horizon}"
  else:
    text = f"reference_ramp {v} * (step // steps_per_epoch) / steps_per_epoch"
  if cfg["warmup_steps"] > 0:
    text += f", warm-up from {_fmt(cfg['warmup_value'])} over {cfg['warmup_steps']} steps"
  return text


# --- helpers -----------------------------------------------------------------------------------------


def _steps_to_float(step) -> jnp.ndarray:
  step = jnp.asarray(step)
  if not (jnp.issubdtype(step.dtype, jnp.integer) or jnp.issubdtype(step.dtype, jnp.floating)):
    raise ValueError(f"a schedule's step must be an integer (or integer array), got dtype {step.dtype}.")
  return step.astype(jnp.float32)


def _resolve_steps(cfg: Mapping, total_steps: int, start: int) -> int:
  steps = int(cfg["steps"])
  if steps > 0:
    return steps
  if start >= total_steps:
    raise ValueError(
        f"schedule field 'start_step' = {start} must be < total_steps = {total_steps} when 'steps' = 0 "
        "(until the end of training); lower start_step or set steps > 0."
    )
  return total_steps - start


def _validate(cfg: Mapping) -> None:
  """Checks the key set, the kind and the ranges of every field; raises ValueError naming the field."""
  try:
    keys = set(cfg.keys())
  except AttributeError:
    raise ValueError(
        f"a schedule config must be a ConfigDict or mapping, got {type(cfg).__name__}."
    ) from None
  missing, extra = set(FIELD_TYPES) - keys, keys - set(FIELD_TYPES)
  if missing or extra:
    raise ValueError(
        f"schedule config keys must be exactly {sorted(FIELD_TYPES)}; missing {sorted(missing)}, "
        f"unexpected {sorted(extra)}. Build it with schedule_config(...)."
    )
  kind = cfg["kind"]
  if kind not in KINDS:
    raise ValueError(f"schedule field 'kind' = {kind!r} is unknown; allowed: {', '.join(KINDS)}.")
  for name, typ in FIELD_TYPES.items():
    if typ is float:
      _as_float(name, cfg[name])
    elif typ is int:
      _as_int(name, cfg[name])
  for name in ("start_step", "steps", "warmup_steps"):
    if cfg[name] < 0:
      raise ValueError(f"schedule field '{name}' = {cfg[name]} is negative; allowed: an integer >= 0.")
  if cfg["every"] < 1:
    raise ValueError(f"schedule field 'every' = {cfg['every']} is invalid; allowed: an integer >= 1.")
  if cfg["rate"] < 0:
    raise ValueError(
        f"schedule field 'rate' = {cfg['rate']} is negative; allowed: a decay factor >= 0 (e.g. 0.99)."
    )
  if cfg["cycles"] <= 0:
    raise ValueError(f"schedule field 'cycles' = {cfg['cycles']} is invalid; allowed: a number > 0.")


def _as_float(name: str, x) -> float:
  if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
    raise ValueError(f"schedule field '{name}' = {x!r} is invalid; allowed: a finite number.")
  return float(x)


def _as_int(name: str, x) -> int:
  if isinstance(x, bool) or not isinstance(x, numbers.Integral):
    raise ValueError(f"schedule field '{name}' = {x!r} is invalid; allowed: an integer.")
  return int(x)


def _positive_int_arg(name: str, x) -> int:
  if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
    raise ValueError(f"{name} = {x!r} is invalid; allowed: an integer >= 1.")
  return int(x)


def _fmt(x: float) -> str:
  return repr(float(x))
