"""train_and_evaluate(config, workdir): set-up, the training loop, evaluation, logging and checkpoints.

Everything heavy happens in the two jitted functions of `train_step`; this loop only feeds batches, merges
metrics on device and, every N steps, logs, evaluates and checkpoints. Only process 0 writes logs.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tensorflow.io import gfile  # local paths and gs:// alike (workdirs on GCS for TPU pods)
from clu import metric_writers, periodic_actions

from semi_jax import checkpointing, config_validation, datasets, input_pipeline, memory_bank, metrics, sharding
from semi_jax.models import create_model
from semi_jax.state import create_train_state, make_optimizer
from semi_jax.train_step import StepContext, eval_step, train_step

EVAL_LOG = "eval.jsonl"
SUMMARY = "summary.json"
CONFIG_FILE = "config.json"
# Fields that may differ between the saved config of a workdir and a resuming run without
# --config.allow_config_change: they extend the run, change its bookkeeping or where data is read from, but
# not what a step computes. (Extending total_steps stretches the step schedules from the resume point on.)
RESUME_SAFE_FIELDS = ("allow_config_change", "train.total_steps", "train.log_every_steps",
                      "train.eval_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
                      "train.print_table", "train.skip_nonfinite_steps", "data.data_dir", "data.prefetch")
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _prefetch_to_mesh(iterator, mesh, size: int):
  """Turns local numpy batches into global device arrays, `size` batches ahead of the consumer."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(sharding.to_global(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class Trainer:
  """Holds the compiled functions and data of one run; `run()` trains to config.train.total_steps."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.is_lead = jax.process_index() == 0
    t = config.train
    self.mesh = sharding.make_mesh(config.mesh)
    config_validation.validate(config, num_devices=self.mesh.devices.size, num_processes=jax.process_count())

    dataset = datasets.load(config.data)
    if dataset.image_size != config.data.image_size:
      raise ValueError(f"data set {dataset.name} has {dataset.image_size}x{dataset.image_size} images but "
                       f"data.image_size={config.data.image_size}; set data.image_size={dataset.image_size}.")
    self.data = input_pipeline.make_ssl_data(dataset, config.data, config.seed)
    self.num_classes = dataset.num_classes
    self.groups = metrics.shot_groups(self.data.labeled_counts, config.eval.many_threshold,
                                      config.eval.few_threshold)
    self.model = create_model(config.model, self.num_classes)
    self.tx = make_optimizer(config)
    self.ctx = StepContext(model=self.model, tx=self.tx, config=config, class_prior=self.data.class_prior,
                           mesh=self.mesh,
                           mean=np.asarray(dataset.mean, np.float32), std=np.asarray(dataset.std, np.float32))
    repl = sharding.replicated(self.mesh)
    self.rng = jax.random.key(config.seed)
    init = functools.partial(create_train_state, self.model, self.tx, image_size=config.data.image_size,
                             num_classes=self.num_classes, bank_size=config.bank.size)
    self.state = jax.jit(init, out_shardings=repl)(jax.random.fold_in(self.rng, 0))
    self.step_rng = jax.random.fold_in(self.rng, 1)

    out_shape = jax.eval_shape(functools.partial(train_step, ctx=self.ctx), self.state,
                               self._batch_spec(), self.step_rng)[1]
    self.metric_keys = sorted(out_shape)
    self.loss_keys = [k for k in self.metric_keys if k.startswith("loss")]
    self.train_metrics_cls = metrics.train_metrics_collection(self.metric_keys)
    step_fn = lambda state, guard, batch, rng: self._guarded_step(state, guard, batch, rng)
    self.train_step = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(repl, repl, repl))
    self.init_guard = jax.jit(self._init_guard, out_shardings=repl)
    self.eval_step = jax.jit(functools.partial(eval_step, ctx=self.ctx), out_shardings=repl)
    self.checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)

  def _init_guard(self):
    """Device-side record of non-finite steps: read on the host only at log and checkpoint steps."""
    return {"first_bad_step": jnp.array(-1, jnp.int32), "skipped": jnp.array(0, jnp.int32),
            "terms": {k: jnp.array(0.0, jnp.float32) for k in self.loss_keys}}

  def _guarded_step(self, state, guard, batch, rng):
    """The train step plus the divergence guard: a step whose loss or gradient norm is NaN/Inf is recorded
    (its number and loss terms) and, with train.skip_nonfinite_steps, replaced by the old state."""
    new_state, out = train_step(state, batch, rng, self.ctx)
    finite = jnp.isfinite(out["loss"]) & jnp.isfinite(out["grad_norm"])
    first = (guard["first_bad_step"] < 0) & ~finite
    guard = {"first_bad_step": jnp.where(first, state.step + 1, guard["first_bad_step"]),
             "skipped": guard["skipped"] + (~finite).astype(jnp.int32),
             "terms": {k: jnp.where(first, out[k], v) for k, v in guard["terms"].items()}}
    if self.config.train.skip_nonfinite_steps:
      # The step still advances: the next batch and schedules follow the step count, not the updates.
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=new_state.step)
      # Skipped steps leave the averages (clu wants a leading axis on masked values).
      out = {k: jnp.where(finite, v, 0.0)[None] for k, v in out.items()}
      return new_state, guard, self.train_metrics_cls.single_from_model_output(**out, mask=finite[None])
    return new_state, guard, self.train_metrics_cls.single_from_model_output(**out)

  def _check_guard(self, guard) -> dict:
    """Raises FloatingPointError naming the first non-finite step and its loss terms (unless skipping)."""
    g = jax.device_get(guard)
    if int(g["first_bad_step"]) >= 0 and not self.config.train.skip_nonfinite_steps:
      self.checkpointer.wait()
      terms = ", ".join(f"{k}={float(v):.4g}" for k, v in g["terms"].items())
      raise FloatingPointError(
          f"non-finite loss or gradients at step {int(g['first_bad_step'])}: {terms}. Training stopped; the "
          f"last good checkpoint (step {self.checkpointer.latest_step()}) in {self.checkpointer.directory} is "
          "kept. Lower optim.lr, or set train.skip_nonfinite_steps=True to skip such steps.")
    return g

  def _batch_spec(self):
    t, s = self.config.train, self.config.data.image_size
    b, u = t.batch_size, t.batch_size * t.mu
    img = lambda n: jax.ShapeDtypeStruct((n, s, s, 3), jnp.uint8)
    lab = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
    return {"x": img(b), "y": lab(b), "u_weak": img(u), "u_strong1": img(u), "u_strong2": img(u),
            "u_label": lab(u), "u_index": lab(u)}

  def restore(self) -> int:
    restored = self.checkpointer.restore(self.state)
    if restored is not None:
      self.state = restored
    return int(jax.device_get(self.state.step))

  def evaluate(self) -> dict:
    """Test-set summaries of both heads on the EMA weights."""
    d = self.data.dataset
    sums = None
    for batch in input_pipeline.eval_batches(d.test_images, d.test_labels, self.config.train.eval_batch_size,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count()):
      out = self.eval_step(self.state.ema_params, self.state.batch_stats, sharding.to_global(batch, self.mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    result = {"standard": metrics.summarize_confusion(sums["confusion"], self.groups),
              "balanced": metrics.summarize_confusion(sums["confusion_b"], self.groups),
              "loss_b": float(sums["loss_b_sum"] / max(sums["count"], 1.0))}
    result["reported"] = "balanced" if self.config.ssl.dual_head else "standard"
    return result

  def _write_eval(self, writer, step: int, result: dict) -> None:
    head = result[result["reported"]]
    scalars = {"eval/acc": head["acc"], "eval/balanced_acc": head["balanced_acc"],
               "eval/acc_standard_head": result["standard"]["acc"],
               "eval/acc_balanced_head": result["balanced"]["acc"], "eval/loss_balanced_head": result["loss_b"]}
    for g in ("many", "medium", "few"):
      scalars[f"eval/acc_{g}"] = head[f"acc_{g}"]
    for c, a in enumerate(head["per_class"]):
      scalars[f"eval_class/acc_{c:03d}"] = a
    bank = jax.device_get(self.state.semi.bank)
    fill = np.asarray(memory_bank.fill_fraction(bank))
    conf = np.asarray(memory_bank.mean_confidence(bank))
    if self.config.bank.enabled:
      for c in range(self.num_classes):
        scalars[f"bank/fill_{c:03d}"] = fill[c]
        scalars[f"bank/confidence_{c:03d}"] = conf[c]
    writer.write_scalars(step, scalars)
    if self.is_lead:
      record = {"step": step, "reported": result["reported"], "loss_b": result["loss_b"],
                "bank_fill": fill.tolist(), "bank_confidence": conf.tolist()}
      for name in ("standard", "balanced"):
        record[name] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result[name].items()}
      with gfile.GFile(os.path.join(self.workdir, EVAL_LOG), "a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")

  def run(self) -> dict:
    """Trains from the newest good checkpoint to train.total_steps. SIGTERM / SIGINT finish the current
    step, write a checkpoint and return early (summary["preempted"] is True); the next run resumes there."""
    config, t = self.config, self.config.train
    start = self.restore()
    if self.is_lead:
      _truncate_eval_log(os.path.join(self.workdir, EVAL_LOG), start)
    writer = metric_writers.create_default_writer(self.workdir, just_logging=not self.is_lead,
                                                  asynchronous=True)
    if start == 0:
      writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
    logging.info("Training from step %d to %d on %d devices (%d processes); labeled per class %s",
                 start, t.total_steps, self.mesh.devices.size, jax.process_count(),
                 self.data.labeled_counts.tolist())
    hooks = []
    if self.is_lead:
      hooks.append(periodic_actions.ReportProgress(num_train_steps=t.total_steps, writer=writer,
                                                   every_steps=t.log_every_steps))
    ds = input_pipeline.train_dataset(self.data, config, start_step=start, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    batches = _prefetch_to_mesh(input_pipeline.as_numpy(ds), self.mesh, config.data.prefetch)
    result = None
    train_metrics = None
    guard = self.init_guard()
    preempted = None
    t0 = time.time()
    with _PreemptionFlag() as stop:
      for step in range(start, t.total_steps):
        batch = next(batches)
        self.state, guard, step_metrics = self.train_step(self.state, guard, batch, self.step_rng)
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        done = step + 1
        for hook in hooks:
          hook(done)
        if done % t.log_every_steps == 0 or done == t.total_steps:
          g = self._check_guard(guard)
          values = jax.device_get(train_metrics.compute())
          values["skipped_steps"] = int(g["skipped"])
          writer.write_scalars(done, {f"train/{k}": v for k, v in values.items()})
          train_metrics = None
        if done % t.eval_every_steps == 0 or done == t.total_steps:
          result = self.evaluate()
          self._write_eval(writer, done, result)
        if stop.signum is not None or done % t.checkpoint_every_steps == 0 or done == t.total_steps:
          self._check_guard(guard)  # never save a state reached through a non-finite step
          self.checkpointer.save(done, self.state, force=stop.signum is not None)
        if stop.signum is not None:
          preempted = stop.signum
          logging.warning("Received signal %d: stopped after step %d and saved a checkpoint; rerun the same "
                          "command to resume.", preempted, done)
          break
    trained = int(jax.device_get(self.state.step)) - start
    self.skipped_steps = int(jax.device_get(guard["skipped"]))
    self.checkpointer.close()
    if preempted is not None:
      writer.flush()
      return {"step": start + trained, "trained_steps": trained, "preempted": True,
              "train_seconds": time.time() - t0}
    if result is None:  # nothing left to train: report the restored model
      result = self.evaluate()
    writer.flush()
    elapsed = time.time() - t0
    summary = self._summary(result, trained, elapsed)
    if self.is_lead:
      with gfile.GFile(os.path.join(self.workdir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)
      if t.print_table:
        print(self.final_report(result, summary))
    return summary

  def _summary(self, result, trained_steps: int, elapsed: float) -> dict:
    head = result[result["reported"]]
    return {"step": int(jax.device_get(self.state.step)), "reported_head": result["reported"],
            "acc": head["acc"], "balanced_acc": head["balanced_acc"],
            "acc_many": head["acc_many"], "acc_medium": head["acc_medium"], "acc_few": head["acc_few"],
            "acc_standard_head": result["standard"]["acc"], "acc_balanced_head": result["balanced"]["acc"],
            "per_class": [float(a) for a in head["per_class"]],
            "labeled_counts": self.data.labeled_counts.tolist(),
            "trained_steps": trained_steps, "skipped_steps": self.skipped_steps, "train_seconds": elapsed}

  def final_report(self, result, summary) -> str:
    table = metrics.format_table({"standard": result["standard"]["per_class"],
                                  "balanced": result["balanced"]["per_class"]},
                                 self.data.labeled_counts, self.data.unlabeled_counts)
    s = summary
    return (f"\nPer-class test accuracy (%) after {s['step']} steps, EMA weights:\n{table}\n"
            f"Reported head ({s['reported_head']}): top-1 {s['acc']:.2f}  balanced {s['balanced_acc']:.2f}  "
            f"many {s['acc_many']:.2f}  medium {s['acc_medium']:.2f}  few {s['acc_few']:.2f}\n")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


class _PreemptionFlag:
  """Within the block SIGTERM and SIGINT only set `signum` (checked after each step); the previous handlers
  come back on exit. Outside the main thread signals cannot be caught and the flag stays unset."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handler) for s in PREEMPTION_SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False


def _truncate_eval_log(path: str, step: int) -> None:
  """Drops eval records after `step` (written by a run that was killed before its next checkpoint), so a
  resumed run's log equals an uninterrupted one."""
  if not gfile.exists(path):
    return
  with gfile.GFile(path) as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if json.loads(line)["step"] <= step]
  if len(keep) != len(lines):
    with gfile.GFile(path + ".tmp", "w") as f:
      f.write("".join(keep))
    gfile.rename(path + ".tmp", path, overwrite=True)


def config_diff(saved: dict, current: dict, ignore=RESUME_SAFE_FIELDS) -> list[str]:
  """Lines `field: saved -> current` for every flattened field that differs, except `ignore`."""
  a, b = _flatten(saved), _flatten(current)
  return [f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def check_workdir_config(config, workdir: str) -> None:
  """Writes workdir/config.json at the first start; later starts must match it up to RESUME_SAFE_FIELDS
  unless config.allow_config_change (then the new config replaces the saved one)."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  if gfile.exists(path):
    with gfile.GFile(path) as f:
      saved = json.load(f)
    diff = config_diff(saved, current)
    if diff and not config.allow_config_change:
      raise config_validation.ConfigError(
          f"workdir {workdir} holds a run with a different config ({path}):\n" + "\n".join(diff) +
          "\nUse a new --workdir, or pass --config.allow_config_change=True to resume with the new values.")
    if diff:
      logging.warning("Resuming %s with a changed config:\n%s", workdir, "\n".join(diff))
  if jax.process_index() == 0:
    with gfile.GFile(path + ".tmp", "w") as f:
      json.dump(current, f, indent=1, sort_keys=True)
    gfile.rename(path + ".tmp", path, overwrite=True)


def train_and_evaluate(config, workdir: str) -> dict:
  config_validation.validate(config)
  gfile.makedirs(workdir)
  check_workdir_config(config, workdir)
  return Trainer(config, workdir).run()
