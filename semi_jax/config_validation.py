"""Checks every configuration value before anything is compiled; messages name field, value and fix."""
from __future__ import annotations

import math
import re

from absl import logging

from semi_jax import algorithms, config_files, cpu, device_augment, long_tail, memory_bank, miner, models
from semi_jax import schedules
from semi_jax.models import resnet


class ConfigError(ValueError):
  """An invalid configuration value."""


def _check(cond: bool, field: str, value, allowed: str) -> None:
  if not cond:
    raise ConfigError(f"config field {field}={value!r} is invalid: {allowed}.")


def _schedule_range(cfg, field: str, lo: float, hi: float, total: int, spe: int) -> list[float]:
  """Checks a schedule at a few steps of the run; returns its values there."""
  points = sorted({0, total // 4, total // 2, max(total - 1, 0)})
  try:
    values = schedules.sample(cfg, total, spe, points)
  except ValueError as e:
    raise ConfigError(f"config field {field}: {_schedule_message(str(e), field, total)}") from None
  bad = [(p, float(v)) for p, v in zip(points, values) if not lo <= v <= hi]
  if bad:
    raise ConfigError(f"config field {field} ({schedules.describe(cfg)}) leaves [{lo}, {hi}]: "
                      f"value {bad[0][1]:.4g} at step {bad[0][0]}.")
  return [float(v) for v in values]


def _schedule_message(message: str, field: str, total: int) -> str:
  """A schedule error in the config's words: `schedule field 'k'` becomes the config field `field.k`, and an
  error about the run length also names train.total_steps as a fix."""
  message = re.sub(r"schedule field '(\w+)'", lambda m: f"{field}.{m.group(1)}", message)
  message = re.sub(r"(?<![.\w])total_steps", "train.total_steps", message)
  if "train.total_steps" in message:
    message += f" Or raise train.total_steps (now {total})."
  return message


def _check_divisible(value: int, field: str, parts: int, what: str) -> None:
  _check(value % parts == 0, field, value,
         f"must be divisible by the {parts} {what} (global batch split evenly); choose a multiple of {parts}")


def global_batches(config) -> dict[str, int]:
  """The global batches of a train step (labeled, unlabeled) and of the evaluation, by the fields that set them."""
  t = config.train
  return {"train.batch_size": t.batch_size, "train.batch_size * train.mu": t.batch_size * t.mu,
          "train.eval_batch_size": t.eval_batch_size}


def check_batches_divide(config, parts: int, what: str) -> None:
  """Every global batch of `config` splits evenly into `parts` (devices or processes), else ConfigError."""
  for field, value in global_batches(config).items():
    _check_divisible(value, field, parts, what)


def _check_model_fields(m) -> None:
  """The fields of the chosen model (see `semi_jax.models`); the other model's fields are not read."""
  if m.name == "wide_resnet":
    _check(m.depth >= 10 and (m.depth - 4) % 6 == 0, "model.depth", m.depth,
           "WideResNet depth is 6n+4, >= 10 (10, 16, 22, 28, ...)")
    _check(m.width >= 1, "model.width", m.width, "must be >= 1")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(m.leaky_slope >= 0, "model.leaky_slope", m.leaky_slope, "must be >= 0")
    return
  blocks = tuple(m.blocks)
  _check(len(blocks) == len(resnet.STAGE_STRIDES) and all(isinstance(b, int) and b >= 1 for b in blocks),
         "model.blocks", m.blocks, f"model.name=resnet needs {len(resnet.STAGE_STRIDES)} residual-block counts "
         ">= 1, one per stage: (3, 4, 6, 3) with model.block=bottleneck is ResNet-50, (2, 2, 2, 2) with "
         "model.block=basic ResNet-18 (model.depth is WideResNet's, 6n+4; resnet ignores it)")
  _check(m.block in resnet.BLOCKS, "model.block", m.block, f"choose one of {resnet.BLOCKS}")
  _check(m.base_width >= 1, "model.base_width", m.base_width, "must be >= 1 (64 in the reference ResNet)")
  _check(m.dropout == 0.0, "model.dropout", m.dropout,
         "applies to model.name=wide_resnet only; the resnet has no dropout: set 0")


def check_device_augment(config) -> None:
  """ConfigError unless the train step can make the views of `config` (data.augment_on resolved to device)."""
  d, t = config.data, config.train
  try:
    device_augment.Settings.from_config(d)
  except ValueError as e:
    raise ConfigError(f"config fields data.* of the augmentation with data.augment_on={d.augment_on!r}: {e} "
                      "Fix the field, or set data.augment_on=host.") from None
  # The device keys fold in int32 stream positions; the unlabeled stream reaches the largest.
  last_position = t.total_steps * t.batch_size * t.mu - 1
  _check(last_position < 2**31, "data.augment_on", d.augment_on,
         f"the views are made on the device from int32 stream positions, but the unlabeled stream reaches "
         f"position {last_position} (train.total_steps={t.total_steps} * train.batch_size={t.batch_size} * "
         f"train.mu={t.mu}), which must stay below 2**31; use data.augment_on=host, or lower train.total_steps to "
         f"at most {2**31 // (t.batch_size * t.mu)}")


def validate(config, num_devices: int | None = None, num_processes: int | None = None) -> None:
  """Raises ConfigError for the first invalid value. With `num_devices` / `num_processes` (the data-axis
  size of the mesh and the JAX process count) also checks that every global batch divides over them."""
  d, m, t, o, s = config.data, config.model, config.train, config.optim, config.ssl
  _check(config.seed >= 0, "seed", config.seed, "must be >= 0")
  _check(config.cpu_fast_paths in cpu.SETTINGS, "cpu_fast_paths", config.cpu_fast_paths,
         f"choose one of {cpu.SETTINGS} (auto: on exactly when the mesh's devices are CPUs)")
  _check(config.mesh.data_axis_size == -1 or config.mesh.data_axis_size >= 1, "mesh.data_axis_size",
         config.mesh.data_axis_size, "must be -1 (all devices) or >= 1")
  _check(d.test_per_class >= 1, "data.test_per_class", d.test_per_class, "must be >= 1")
  _check(d.val_per_class >= 0, "data.val_per_class", d.val_per_class, "must be >= 0 (0: no validation set)")
  _check(d.prefetch >= 0, "data.prefetch", d.prefetch, "must be >= 0")
  _check(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8")
  _check(d.labeled_max >= 1, "data.labeled_max", d.labeled_max, "must be >= 1")
  _check(d.unlabeled_max >= 1, "data.unlabeled_max", d.unlabeled_max, "must be >= 1")
  _check(d.labeled_imb >= 1, "data.labeled_imb", d.labeled_imb, "imbalance ratio gamma must be >= 1")
  _check(d.unlabeled_imb >= 1, "data.unlabeled_imb", d.unlabeled_imb, "imbalance ratio gamma must be >= 1")
  # The tail class gets int(labeled_max / labeled_imb) labeled images. At 0 the labeled class prior has a zero:
  # the logit-adjusted heads subtract tau * log(prior) and the balanced head collapses onto that class.
  _check(d.labeled_fraction > 0 or d.labeled_max >= d.labeled_imb, "data.labeled_imb", d.labeled_imb,
         f"with data.labeled_max={d.labeled_max} the tail class gets int({d.labeled_max} / {d.labeled_imb}) = 0 "
         f"labeled images, and every class needs at least one; lower data.labeled_imb to at most "
         f"{d.labeled_max} or raise data.labeled_max to at least {math.ceil(d.labeled_imb)}")
  _check(d.unlabeled_dist in long_tail.DISTRIBUTIONS, "data.unlabeled_dist", d.unlabeled_dist,
         f"choose one of {long_tail.DISTRIBUTIONS}")
  _check(0.0 <= d.labeled_fraction < 1.0, "data.labeled_fraction", d.labeled_fraction, "must be in [0, 1)")
  _check(0.0 <= d.pad_fraction < 0.5, "data.pad_fraction", d.pad_fraction, "must be in [0, 0.5)")
  _check(0 <= d.randaugment_ops <= 14, "data.randaugment_ops", d.randaugment_ops, "must be in [0, 14]")
  _check(1 <= d.randaugment_magnitude <= 30, "data.randaugment_magnitude", d.randaugment_magnitude,
         "must be in [1, 30]")
  _check(0.0 <= d.cutout_fraction <= 1.0, "data.cutout_fraction", d.cutout_fraction, "must be in [0, 1]")
  _check(d.augment_on in device_augment.PLACES, "data.augment_on", d.augment_on,
         f"choose one of {device_augment.PLACES} (auto: device on GPUs, host elsewhere)")
  if d.augment_on == "device":
    check_device_augment(config)
  _check(m.name in models.MODELS, "model.name", m.name, f"choose one of {models.MODELS}")
  _check_model_fields(m)
  _check(0.0 < m.bn_momentum < 1.0, "model.bn_momentum", m.bn_momentum, "must be in (0, 1)")
  _check(m.dtype in models.DTYPES, "model.dtype", m.dtype, f"choose one of {models.DTYPES}")
  _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
  _check(t.mu >= 1, "train.mu", t.mu, "must be >= 1")
  _check(t.total_steps >= 1, "train.total_steps", t.total_steps, "must be >= 1")
  _check(t.steps_per_epoch >= 1, "train.steps_per_epoch", t.steps_per_epoch, "must be >= 1")
  for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "eval_batch_size"):
    _check(t[name] >= 1, f"train.{name}", t[name], "must be >= 1")
  for parts, what in ((num_devices, "devices of the mesh data axis"), (num_processes, "JAX processes")):
    if parts:
      check_batches_divide(config, parts, what)
  _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
  _check(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "must be in [0, 1)")
  _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
  _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", o.ema_decay, "must be in [0, 1)")
  _check(s.algo in algorithms.ALGOS + (algorithms.CUSTOM,), "ssl.algo", s.algo,
         f"choose one of {algorithms.ALGOS + (algorithms.CUSTOM,)} ({algorithms.CUSTOM}: switches of your own)")
  _check(s.temperature > 0, "ssl.temperature", s.temperature, "must be > 0")
  for name in ("tau1", "tau12", "tau2"):
    _check(s[name] >= 0, f"ssl.{name}", s[name], "logit-adjustment strength must be >= 0")
  epochs = -(-t.total_steps // t.steps_per_epoch)
  _check(s.est_epoch >= 0, "ssl.est_epoch", s.est_epoch, "must be >= 0 (0: the SeMi components start in epoch 1)")
  _check(s.est_epoch < epochs, "ssl.est_epoch", s.est_epoch,
         f"must be in [0, {epochs}): training has {epochs} epochs of {t.steps_per_epoch} steps "
         f"(train.total_steps={t.total_steps}, train.steps_per_epoch={t.steps_per_epoch}) and the SeMi components "
         f"start after epoch ssl.est_epoch; lower ssl.est_epoch, or raise train.total_steps or lower "
         "train.steps_per_epoch")
  _check(not (s.reference_row_order and t.mu != 1), "ssl.reference_row_order", s.reference_row_order,
         "reproduces the reference's row order, which exists only for train.mu == 1")
  total, spe = t.total_steps, t.steps_per_epoch
  _schedule_range(o.lr_schedule, "optim.lr_schedule", 0.0, 100.0, total, spe)
  _schedule_range(s.threshold, "ssl.threshold", 0.0, 1.0, total, spe)
  _schedule_range(s.monitor_df, "ssl.monitor_df", 0.0, 1.0, total, spe)
  _check(config.miner.mode in miner.MODES, "miner.mode", config.miner.mode, f"choose one of {miner.MODES}")
  _schedule_range(config.miner.scale, "miner.scale", 0.0, 1.0, total, spe)
  _check(0.0 < config.miner.hard_fraction <= 1.0, "miner.hard_fraction", config.miner.hard_fraction,
         "must be in (0, 1]")
  b = config.bank
  _check(config.bank.size >= 1, "bank.size", config.bank.size, "K entries per class must be >= 1")
  _check(b.dtype in memory_bank.DTYPES, "bank.dtype", b.dtype, f"choose one of {memory_bank.DTYPES}")
  decay_every = _schedule_range(config.bank.decay_every, "bank.decay_every", 1.0, float("inf"), total, spe)
  _schedule_range(config.bank.beta, "bank.beta", 0.0, 1.0, total, spe)
  p = config.plce
  _check(not (p.enabled and not config.bank.enabled), "plce.enabled", p.enabled,
         "prototype mixing reads prototypes from the memory bank: enable bank (bank=on) or disable plce")
  _check(0.0 <= p.alpha <= 1.0, "plce.alpha", p.alpha, "must be in [0, 1]")
  _check(p.tau_tar > 0, "plce.tau_tar", p.tau_tar, "must be > 0")
  _check(p.class_weight in algorithms.CLASS_WEIGHTS, "plce.class_weight", p.class_weight,
         f"choose one of {algorithms.CLASS_WEIGHTS}")
  _schedule_range(p.ramp, "plce.ramp", 0.0, 1.0, total, spe)
  c = config.cons
  _check(c.weight >= 0, "cons.weight", c.weight, "must be >= 0")
  _check(c.proto_t > 0, "cons.proto_t", c.proto_t, "must be > 0")
  _check(0.0 <= c.center_momentum < 1.0, "cons.center_momentum", c.center_momentum, "must be in [0, 1)")
  _check(b.decay_clock in algorithms.DECAY_CLOCKS, "bank.decay_clock", b.decay_clock,
         f"choose one of {algorithms.DECAY_CLOCKS} (epoch: the counter restarts every epoch, as the reference)")
  if b.enabled and b.decay_clock == "epoch":
    longest = max(round(v) for v in decay_every)
    if longest > spe:  # legal (the reference behaves so), but rarely what an ablation means
      logging.warning("bank.decay_every=%d exceeds train.steps_per_epoch=%d with bank.decay_clock=epoch: the "
                      "per-epoch counter restarts before it is reached and the bank never decays, as in the "
                      "reference. Use bank.decay_clock=global or a shorter interval to decay it.", longest, spe)
  _check(p.class_weight_counts in algorithms.COUNT_WINDOWS, "plce.class_weight_counts", p.class_weight_counts,
         f"choose one of {algorithms.COUNT_WINDOWS}")
  _check(config.eval.few_threshold >= 0, "eval.few_threshold", config.eval.few_threshold, "must be >= 0")
  _check(config.eval.few_threshold <= config.eval.many_threshold, "eval.few_threshold",
         config.eval.few_threshold, f"must be <= eval.many_threshold ({config.eval.many_threshold})")
  mismatch = algorithms.preset_mismatch(config)
  if mismatch:
    diff = ", ".join(f"{f}={v} (preset: {want})" for f, (v, want) in mismatch.items())
    raise ConfigError(
        f"config field ssl.algo={s.algo!r} does not match its switches: {diff}. The run would train something "
        f"else under that name. Use the preset (--config=FILE:algo={s.algo} sets every switch), or set "
        f"--config.ssl.algo={algorithms.CUSTOM} for a combination of your own (the switches that run are recorded "
        "in config.json and summary.json).")
  for line in start_up_warnings(config):
    logging.warning("%s", line)


# The SeMi components that run only after the warm-up of ssl.est_epoch epochs.
_AFTER_WARMUP = ("miner", "plce", "cons")


def start_up_warnings(config) -> list[str]:
  """Settings that are valid but make part of the run do nothing, which the run would otherwise train silently:
  SeMi components whose warm-up outlasts the run, and every schedule whose kind says it changes over training but
  whose parameters keep it constant over the run (`schedule_warnings`). One line each, naming the field and the
  setting that fixes it."""
  t, s = config.train, config.ssl
  lines = []
  last_epoch = (t.total_steps - 1) // t.steps_per_epoch
  waiting = [name for name in _AFTER_WARMUP if config[name].enabled]
  if waiting and s.est_epoch >= last_epoch:
    lines.append(
        f"ssl.est_epoch={s.est_epoch}: {', '.join(waiting)} start after epoch ssl.est_epoch, but the run's last "
        f"epoch is {last_epoch} (epochs of train.steps_per_epoch={t.steps_per_epoch} steps, "
        f"train.total_steps={t.total_steps}), so they never run; lower ssl.est_epoch below {last_epoch}, or raise "
        "train.total_steps or lower train.steps_per_epoch")
  return lines + schedule_warnings(config)


def schedule_warnings(config) -> list[str]:
  """One line per schedule whose kind changes over training (every kind but constant) while its parameters keep it
  constant over the run: e.g. --config.bank.beta.kind=exponential alone leaves rate=1.0, and the run would train
  the constant schedule under another name. Schedules of a disabled component are not read and not reported;
  a run of one step has nothing to change."""
  total, spe = config.train.total_steps, config.train.steps_per_epoch
  if total < 2:
    return []
  lines = []
  for path in config_files.schedule_paths(config):
    group = config[path.split(".")[0]]
    if "enabled" in group and not group.enabled:
      continue
    cfg = config
    for part in path.split("."):
      cfg = cfg[part]
    line = _constant_schedule(cfg, path, total, spe)
    if line:
      lines.append(line)
  return lines


def _constant_schedule(cfg, path: str, total: int, spe: int) -> str | None:
  """Why the schedule `cfg` of a changing kind is constant over a run of `total` steps (None: it changes)."""
  kind, flag, last = cfg.kind, f"--config.{path}", total - 1
  if kind == "constant":
    return None
  head = f"{path}: kind={kind}"
  own = dict(cfg.items(), warmup_steps=0)  # the kind's own change, without the warm-up laid over its start
  if schedules.is_constant(own):
    if kind in ("linear", "cosine"):
      return (f"{head} with end_value={cfg.end_value} equal to value={cfg.value} is constant; set {flag}.end_value "
              "(the value at the end of the window)")
    if kind in ("exponential", "step") and cfg.value != 0:
      return f"{head} with rate={cfg.rate} is constant; set {flag}.rate (e.g. 0.5) and {flag}.every"
    return f"{head} with value={cfg.value} is 0 at every step; set {flag}.value"
  start = cfg.start_step
  if kind in ("linear", "cosine", "exponential", "step") and start >= last:
    return (f"{head} starts changing after start_step={start}, but the run's last step is {last} "
            f"(train.total_steps={total}), so it is constant; lower {flag}.start_step below {last}")
  if kind == "step" and start + cfg.every > last:
    return (f"{head} first changes at step start_step + every = {start + cfg.every}, after the run's last step "
            f"{last} (train.total_steps={total}), so it is constant; lower {flag}.every (e.g. "
            f"{max(1, (last - start) // 4)})")
  if kind == "reference_cosine" and cfg.warmup_steps >= last:
    return (f"{head} decays after its warm-up of warmup_steps={cfg.warmup_steps}, but the run's last step is "
            f"{last} (train.total_steps={total}), so it never decays; lower {flag}.warmup_steps")
  if kind == "reference_ramp" and spe >= total:
    return (f"{head} is value * (step // train.steps_per_epoch) / train.steps_per_epoch, 0 at every step of a run "
            f"of train.total_steps={total} with train.steps_per_epoch={spe}; lower train.steps_per_epoch below "
            f"{total}, or use {flag}.kind=linear")
  return None
