"""train_and_evaluate(config, workdir): set-up, the training loop, evaluation, logging and checkpoints.

`build_program` builds what a run executes (state init, the guarded train step, the eval step) for a mesh.
Everything heavy happens in those jitted functions; the loop makes one dispatch per step besides the batch
transfer (metrics accumulate on the device) and, every N steps, logs, evaluates and checkpoints. Only process 0
writes logs.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from semi_jax import checkpointing, config_validation, cpu, datasets, device_augment, files, input_pipeline
from semi_jax import memory_bank, metrics, objective, semi_state, sharding
from semi_jax import train_step as steps
from semi_jax.cpu import compiler_options
from semi_jax.models import create_model
from semi_jax.state import create_train_state, make_optimizer

EVAL_LOG = "eval.jsonl"
SUMMARY = "summary.json"
CONFIG_FILE = "config.json"
# Fields that may differ between the saved config of a workdir and a resuming run without
# --config.allow_config_change: they change the run's bookkeeping or where data is read from, not the trajectory.
# The mesh may change: a checkpoint restores on any number of devices and processes (the state is replicated).
# Not train.total_steps: the lr cosine and the ramps are functions of it, so a longer run is another experiment.
RESUME_SAFE_FIELDS = ("allow_config_change", "mesh.data_axis_size", "train.log_every_steps",
                      "train.eval_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
                      "train.print_table", "train.skip_nonfinite_steps", "data.data_dir", "data.prefetch")
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def prefetch(iterator, put, size: int):
  """`put(batch)` (local numpy batches -> global device arrays) of the iterator's batches, `size` batches ahead
  of the consumer."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def batch_spec(config, mesh, views_on_device: bool = False) -> dict:
  """The abstract global train batch of `config` on `mesh`, with its sharding (see `train_step`); with
  `views_on_device` (`Program.views_on_device`), the source batch the step makes the views from."""
  t, s = config.train, config.data.image_size
  b, u = t.batch_size, t.batch_size * t.mu
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharded(mesh))
  labels = {"y": spec((b,), jnp.int32), "u_label": spec((u,), jnp.int32), "u_index": spec((u,), jnp.int32)}
  if views_on_device:
    return {"images": spec((b + u, s, s, 3), jnp.uint8), "positions": spec((b + u,), jnp.int32), **labels}
  return {"images": spec((b + 3 * u, s, s, 3), jnp.uint8), **labels}


def eval_batch_spec(config, mesh) -> dict:
  """The abstract global eval batch of `config` on `mesh`, with its sharding."""
  n, s = config.train.eval_batch_size, config.data.image_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharded(mesh))
  return {"image": spec((n, s, s, 3), jnp.uint8), "label": spec((n,), jnp.int32), "mask": spec((n,), jnp.bool_)}


@dataclasses.dataclass(frozen=True)
class Program:
  """The jitted functions of a run on one mesh, and what they were built with.

  init_state(rng) -> state; init_carry() -> carry; train_step(state, carry, batch, rng) -> (state, carry),
  donating state and carry (`train_step.guarded_step`); reset_metrics(carry) -> carry with the metric sums
  zeroed; reset_pseudo_counts(state) -> state with the per-class pseudo-label counts zeroed;
  eval_step(params, batch_stats, batch) -> sums. All are compiled with `compiler_options`.
  """
  ctx: steps.StepContext
  cpu_fast_paths: bool
  compiler_options: dict
  metrics_cls: Any
  loss_keys: tuple[str, ...]
  init_state: Callable
  init_carry: Callable
  train_step: Callable
  reset_metrics: Callable
  reset_pseudo_counts: Callable
  eval_step: Callable

  @property
  def views_on_device(self) -> bool:
    """Whether the train step makes the views (data.augment_on) and so reads source batches."""
    return self.ctx.augment is not None


def augment_settings(config, mesh, platforms=None):
  """The `device_augment.Settings` of a run whose train step makes the views (data.augment_on, resolved for
  `platforms`, default: those of the mesh's devices), else None."""
  if not device_augment.runs_on_device(config.data.augment_on, cpu.platforms_of(mesh) if platforms is None
                                       else platforms):
    return None
  config_validation.check_device_augment(config)
  return device_augment.Settings.from_config(config.data)


def cpu_fast_paths(config, mesh, platforms=None) -> tuple[bool, dict]:
  """(whether the CPU fast paths are on, the XLA compiler options) of a run of `config` on `mesh`, meant for
  `platforms` (default: those of the mesh's devices). The compiler options apply only where the mesh's devices
  are CPUs."""
  mesh_platforms = cpu.platforms_of(mesh)
  fast = cpu.enabled(config.cpu_fast_paths, mesh_platforms if platforms is None else platforms)
  return fast, compiler_options.for_run(fast and mesh_platforms == {"cpu"})


def step_context(config, mesh, *, num_classes: int, class_prior, mean, std, platforms=None, model=None):
  """(the step's static inputs, whether the CPU fast paths are on, the compiler options) of a run of `config`
  on `mesh`, meant for `platforms` (see `build_program`)."""
  fast, options = cpu_fast_paths(config, mesh, platforms)
  model = model or create_model(config.model, num_classes, cpu_fast_paths=fast)
  ctx = steps.StepContext(model=model, tx=make_optimizer(config), config=config,
                          class_prior=np.asarray(class_prior, np.float32), mean=np.asarray(mean, np.float32),
                          std=np.asarray(std, np.float32), mesh=mesh,
                          augment=augment_settings(config, mesh, platforms))
  return ctx, fast, options


def build_program(config, mesh, *, num_classes: int, class_prior, mean, std, platforms=None,
                  model=None) -> Program:
  """Builds (without compiling) the run's jitted functions for `mesh`.

  `platforms` are the platforms the program is meant for (default: those of the mesh's devices). The CPU fast
  paths (`cpu_fast_paths`) follow them, so that a program lowered for TPU or GPU on a CPU machine gets the
  accelerator layers. `model` replaces the configured one (benchmarks of the loop itself).
  """
  ctx, fast, options = step_context(config, mesh, num_classes=num_classes, class_prior=class_prior, mean=mean,
                                    std=std, platforms=platforms, model=model)
  model = ctx.model
  repl = sharding.replicated(mesh)
  jit = functools.partial(jax.jit, compiler_options=options or None)
  init_state = jit(functools.partial(create_train_state, model, ctx.tx, image_size=config.data.image_size,
                                     num_classes=num_classes, bank_size=config.bank.size,
                                     bank_dtype=config.bank.dtype), out_shardings=repl)
  # The metric names are those the step returns, known once it is traced.
  out_shape = jax.eval_shape(functools.partial(steps.train_step, ctx=ctx), jax.eval_shape(init_state,
                             jax.random.key(0)), batch_spec(config, mesh, ctx.augment is not None),
                             jax.random.key(0))[1]
  metrics_cls = metrics.train_metrics_collection(out_shape)
  loss_keys = tuple(k for k in sorted(out_shape) if k.startswith("loss"))
  step = functools.partial(steps.guarded_step, ctx=ctx, metrics_cls=metrics_cls,
                           skip_nonfinite=config.train.skip_nonfinite_steps)
  return Program(
      ctx=ctx, cpu_fast_paths=fast, compiler_options=options, metrics_cls=metrics_cls, loss_keys=loss_keys,
      init_state=init_state,
      init_carry=jit(functools.partial(steps.init_carry, metrics_cls, loss_keys), out_shardings=repl),
      train_step=jit(step, donate_argnums=(0, 1), out_shardings=(repl, repl)),
      reset_metrics=jit(lambda carry: {**carry, "metrics": metrics_cls.empty()}, donate_argnums=0,
                        out_shardings=repl),
      reset_pseudo_counts=jit(lambda state: state.replace(semi=state.semi.replace(
          pseudo_counts=semi_state.empty_pseudo_counts(num_classes))), donate_argnums=0, out_shardings=repl),
      eval_step=jit(functools.partial(steps.eval_step, ctx=ctx), out_shardings=repl))


def local_blocks(mesh) -> int:
  """This process's devices on the mesh's data axis: the blocks of its part of a train batch."""
  mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if not mine:
    raise ValueError(f"process {jax.process_index()} owns no device of the mesh ({mesh.devices.size} devices); "
                     "every process must own devices of the mesh (sharding.make_mesh chooses them so).")
  return len(mine)


class Trainer:
  """Holds the compiled functions and data of one run; `run()` trains to config.train.total_steps."""

  def __init__(self, config, workdir: str, mesh=None, model=None):
    self.config = config
    self.workdir = workdir
    self.is_lead = jax.process_index() == 0
    t = config.train
    try:
      self.mesh = mesh or sharding.make_mesh(config.mesh)
    except ValueError as e:
      raise config_validation.ConfigError(str(e)) from None
    config_validation.validate(config, num_devices=self.mesh.devices.size, num_processes=jax.process_count())
    # Every check runs before the workdir is touched; a workdir holding another run is refused here.
    files.makedirs(workdir)
    check_workdir_config(config, workdir)

    dataset = datasets.load(config.data)
    if dataset.image_size != config.data.image_size:
      raise ValueError(f"data set {dataset.name} has {dataset.image_size}x{dataset.image_size} images but "
                       f"data.image_size={config.data.image_size}; set data.image_size={dataset.image_size}.")
    self.data = input_pipeline.make_ssl_data(dataset, config.data, config.seed)
    self.num_classes = dataset.num_classes
    self.outputs = RunOutputs(config, workdir, self.data)
    self.program = build_program(config, self.mesh, num_classes=self.num_classes,
                                 class_prior=self.data.class_prior, mean=dataset.mean, std=dataset.std, model=model)
    self.rng = jax.random.key(config.seed)
    self.state = self.program.init_state(jax.random.fold_in(self.rng, 0))
    self.step_rng = jax.random.fold_in(self.rng, 1)
    self.checkpointer = checkpointing.Checkpointer(files.join(workdir, "checkpoints"), t.keep_checkpoints)

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

  def train_batches(self, start: int):
    """This process's train batches from step `start` on, as numpy arrays laid out for the mesh."""
    ds = input_pipeline.train_dataset(self.data, self.config, start_step=start, process_index=jax.process_index(),
                                      process_count=jax.process_count(), blocks=local_blocks(self.mesh),
                                      views_on_device=self.program.views_on_device)
    return input_pipeline.as_numpy(ds)

  def restore(self) -> int:
    restored = self.checkpointer.restore(self.state)
    if restored is not None:
      self.state = restored
    return int(jax.device_get(self.state.step))

  def _evaluate_on(self, images, labels) -> dict:
    """Summaries of both heads on the EMA weights over `images`."""
    sums = None
    for batch in input_pipeline.eval_batches(images, labels, self.config.train.eval_batch_size,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count()):
      out = self.program.eval_step(self.state.ema_params, self.state.batch_stats,
                                   sharding.to_global(batch, self.mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return self.outputs.summarize(jax.device_get(sums))

  def evaluate(self) -> dict:
    """Test-set summaries of both heads on the EMA weights, and under "validation" the same for the held-out
    validation set (data.val_per_class > 0)."""
    d = self.data.dataset
    test = self._evaluate_on(d.test_images, d.test_labels)
    val = self._evaluate_on(*self.data.validation_set()) if len(self.data.val_idx) else None
    return self.outputs.eval_result(test, val)

  def run(self, batches=None) -> dict:
    """Trains from the newest good checkpoint to train.total_steps. SIGTERM / SIGINT finish the current
    step, write a checkpoint and return early (summary["preempted"] is True); the next run resumes there.

    `batches` replaces the input pipeline by an iterator of this process's batches as `train_batches` yields
    them (benchmarks of the loop)."""
    config, t = self.config, self.config.train
    start = self.restore()
    if self.is_lead:
      _truncate_eval_log(files.join(self.workdir, EVAL_LOG), start)
    writer = metric_writers.create_default_writer(self.workdir, just_logging=not self.is_lead,
                                                  asynchronous=True)
    if start == 0:
      writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
    hooks = []
    if self.is_lead:
      hooks.append(periodic_actions.ReportProgress(num_train_steps=t.total_steps, writer=writer,
                                                   every_steps=t.log_every_steps))
    batches = prefetch(self.train_batches(start) if batches is None else batches,
                       functools.partial(sharding.to_global, mesh=self.mesh), config.data.prefetch)
    # Held by the trainer, not only by this frame: destroying a tf.data iterator waits for its worker threads'
    # augmentation in flight (seconds on a busy host), which a preempted process skips (see main).
    self.input = batches
    train_step, result, preempted = self.program.train_step, None, False
    carry = self.program.init_carry()
    t0 = time.time()
    with _Preemption(self.checkpointer) as preemption:
      # Logged once signals are caught: from here on a signal stops the run at a step boundary, with a checkpoint.
      logging.info("Training from step %d to %d on %d devices (%d processes); labeled per class %s",
                   start, t.total_steps, self.mesh.devices.size, jax.process_count(),
                   self.data.labeled_counts.tolist())
      for step in range(start, t.total_steps):
        # The only dispatch of a step: metrics and the divergence guard stay on the device until a log step.
        self.state, carry = train_step(self.state, carry, next(batches), self.step_rng)
        done = step + 1
        stop = preemption.reached(done)
        for hook in hooks:
          hook(done)
        if done % t.log_every_steps == 0 or done == t.total_steps:
          g = self._check_guard(carry["guard"])
          with np.errstate(invalid="ignore"):  # NaN averages where every step of the interval was skipped
            values = {k: float(v) for k, v in jax.device_get(carry["metrics"]).compute().items()}
          values["skipped_steps"] = int(g["skipped"])
          writer.write_scalars(done, {f"train/{k}": v for k, v in values.items()})
          carry = self.program.reset_metrics(carry)
        if done % t.eval_every_steps == 0 or done == t.total_steps:
          result = self.evaluate()
          # Pseudo-label quality since the previous evaluation (one read of the on-device sums).
          result["pseudo_labels"] = metrics.pseudo_label_summary(jax.device_get(self.state.semi.pseudo_counts))
          self.state = self.program.reset_pseudo_counts(self.state)  # before a save at this step: resume-exact
          self.outputs.write_eval(writer, done, result, self.state.semi.bank)
        if stop or done % t.checkpoint_every_steps == 0 or done == t.total_steps:
          self._check_guard(carry["guard"])  # never save a state reached through a non-finite step
          self.checkpointer.save(done, self.state, force=stop)
        if stop:
          preempted = True
          cause = f"signal {preemption.signum}" if preemption.signum else "a preemption notice"
          logging.warning("Received %s: stopped after step %d and saved a checkpoint (every process stops at "
                          "this step); rerun the same command to resume.", cause, done)
          break
    trained = int(jax.device_get(self.state.step)) - start
    self.skipped_steps = int(jax.device_get(carry["guard"]["skipped"]))
    self.checkpointer.close()
    if preempted:
      writer.flush()
      return {"step": start + trained, "trained_steps": trained, "preempted": True,
              "train_seconds": time.time() - t0}
    if result is None:  # nothing left to train: report the restored model
      result = self.evaluate()
    writer.flush()
    return self.outputs.finish(result, step=int(jax.device_get(self.state.step)), trained_steps=trained,
                               skipped_steps=self.skipped_steps, elapsed=time.time() - t0)


class RunOutputs:
  """What one run writes in its workdir, whether it trains alone (`Trainer`) or stacked with others
  (semi_jax.together): eval.jsonl and the TensorBoard scalars and images of every evaluation, summary.json and
  the final per-class table. Only process 0 writes files."""

  def __init__(self, config, workdir: str, data: input_pipeline.SSLData):
    self.config, self.workdir, self.data = config, workdir, data
    self.is_lead = jax.process_index() == 0
    self.groups = metrics.shot_groups(data.labeled_counts, config.eval.many_threshold, config.eval.few_threshold)

  def summarize(self, sums) -> dict:
    """Summaries of both heads from the eval step's sums (numpy) over one image set."""
    return {"standard": metrics.summarize_confusion(sums["confusion"], self.groups),
            "balanced": metrics.summarize_confusion(sums["confusion_b"], self.groups),
            "loss_b": float(sums["loss_b_sum"] / max(sums["count"], 1.0)),
            "confusion": {"standard": sums["confusion"], "balanced": sums["confusion_b"]}}

  def eval_result(self, test: dict, validation: dict | None) -> dict:
    """The evaluation of the run: the test summaries, the reported head, and the validation summaries."""
    result = dict(test, reported="balanced" if self.config.ssl.dual_head else "standard")
    if validation is not None:
      result["validation"] = {"standard": validation["standard"], "balanced": validation["balanced"]}
    return result

  def write_eval(self, writer, step: int, result: dict, bank) -> None:
    head = result[result["reported"]]
    scalars = {"eval/acc": head["acc"], "eval/balanced_acc": head["balanced_acc"],
               "eval/acc_standard_head": result["standard"]["acc"],
               "eval/acc_balanced_head": result["balanced"]["acc"], "eval/loss_balanced_head": result["loss_b"],
               "eval/gm": head["gm"], "eval/macro_precision": head["macro_precision"],
               "eval/macro_recall": head["macro_recall"], "eval/macro_f1": head["macro_f1"]}
    for g in ("many", "medium", "few"):
      scalars[f"eval/acc_{g}"] = head[f"acc_{g}"]
    for c, a in enumerate(head["per_class"]):
      scalars[f"eval_class/acc_{c:03d}"] = a
    if "validation" in result:
      val = result["validation"][result["reported"]]
      scalars.update({"val/acc": val["acc"], "val/balanced_acc": val["balanced_acc"], "val/gm": val["gm"]})
    pl = result.get("pseudo_labels")
    if pl is not None:
      scalars.update({f"pseudo/{k}": pl[k] for k in metrics.PSEUDO_SCALARS})
      for k in ("precision", "recall", "mask_rate", "estimated", "true"):
        scalars.update({f"pseudo_class/{k}_{c:03d}": v for c, v in enumerate(pl[k])})
    bank = jax.device_get(bank)
    fill = np.asarray(memory_bank.fill_fraction(bank))
    conf = np.asarray(memory_bank.mean_confidence(bank))
    if self.config.bank.enabled:
      for c in range(self.data.num_classes):
        scalars[f"bank/fill_{c:03d}"] = fill[c]
        scalars[f"bank/confidence_{c:03d}"] = conf[c]
    writer.write_scalars(step, scalars)
    confusion = result["confusion"][result["reported"]]
    writer.write_images(step, {"eval/confusion_matrix": metrics.confusion_image(confusion)[None],
                               "eval/per_class_accuracy": metrics.bar_image(head["per_class"])[None]})
    if self.is_lead:
      record = {"step": step, "reported": result["reported"], "loss_b": result["loss_b"],
                "bank_fill": fill.tolist(), "bank_confidence": conf.tolist()}
      as_json = lambda summary: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in summary.items()}
      for name in ("standard", "balanced"):
        record[name] = as_json(result[name])
      if "validation" in result:
        record["validation"] = {name: as_json(result["validation"][name]) for name in ("standard", "balanced")}
      if "pseudo_labels" in result:
        record["pseudo_labels"] = as_json(result["pseudo_labels"])
      files.append_line(files.join(self.workdir, EVAL_LOG), json.dumps(record, allow_nan=True))

  def finish(self, result, *, step: int, trained_steps: int, skipped_steps: int, elapsed: float) -> dict:
    """The run's summary; process 0 writes it to summary.json and prints the per-class table."""
    summary = self.summary(result, step=step, trained_steps=trained_steps, skipped_steps=skipped_steps,
                           elapsed=elapsed)
    if self.is_lead:
      summary["selected_by_validation"] = self.selected_by_validation()
      files.write_json_atomic(files.join(self.workdir, SUMMARY), summary)
      if self.config.train.print_table:
        print(self.final_report(result, summary))
    return summary

  def summary(self, result, *, step: int, trained_steps: int, skipped_steps: int, elapsed: float) -> dict:
    head = result[result["reported"]]
    return {"step": step, "algo": self.config.ssl.algo,
            "components": objective.switches_of(self.config), "reported_head": result["reported"],
            "acc": head["acc"], "balanced_acc": head["balanced_acc"], "gm": head["gm"],
            "macro_precision": head["macro_precision"], "macro_recall": head["macro_recall"],
            "macro_f1": head["macro_f1"],
            "acc_many": head["acc_many"], "acc_medium": head["acc_medium"], "acc_few": head["acc_few"],
            "acc_standard_head": result["standard"]["acc"], "acc_balanced_head": result["balanced"]["acc"],
            "per_class": [float(a) for a in head["per_class"]],
            "pseudo_labels": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                              for k, v in result.get("pseudo_labels", {}).items()} or None,
            "labeled_counts": self.data.labeled_counts.tolist(),
            "trained_steps": trained_steps, "skipped_steps": skipped_steps, "train_seconds": elapsed}

  def selected_by_validation(self):
    """The evaluation with the best validation balanced accuracy (its step, validation and test accuracy of the
    reported head), from the run's eval log; None without a validation set."""
    records = metrics.read_evals(files.join(self.workdir, EVAL_LOG))
    best = metrics.select_by_validation(records)
    if best is None:
      return None
    r = records[best]
    test, val = r[r["reported"]], r["validation"][r["reported"]]
    return {"step": r["step"], "val_balanced_acc": val["balanced_acc"], "balanced_acc": test["balanced_acc"],
            "acc": test["acc"], "gm": test.get("gm"), "acc_few": test["acc_few"]}

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


class _Preemption:
  """Whether to stop after a step: the same step on every process.

  One process: SIGTERM and SIGINT set a flag, checked after each step; a second SIGINT stops at once.
  Several processes: JAX's preemption sync manager (started by jax.distributed.initialize) owns SIGTERM. A
  notice on any process (SIGTERM, or on Cloud TPU the maintenance notice) reaches all of them through the
  coordination service, and `Checkpointer.reached_preemption` turns True on every process at the same step,
  so that all save one checkpoint together and exit. SIGINT is forwarded to this process as SIGTERM to take
  the same path. Python handlers installed here are undone on exit; outside the main thread nothing is
  installed (signals can only be caught there).
  """

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._synchronised = jax.process_count() > 1
    self.signum = None
    self._previous = {}

  def _flag(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
      raise KeyboardInterrupt
    self.signum = signum

  def _forward_sigint(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    os.kill(os.getpid(), signal.SIGTERM)  # to the sync manager's handler: spread to every process

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    if not self._synchronised:
      self._previous = {s: signal.signal(s, self._flag) for s in PREEMPTION_SIGNALS}
    elif jax.config.jax_enable_preemption_service and not callable(signal.getsignal(signal.SIGTERM)):
      # SIGTERM is left to the sync manager's own (C++) handler, which a Python handler would replace.
      self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._forward_sigint)}
    else:
      logging.warning("JAX's preemption service is off (jax_enable_preemption_service) or a Python SIGTERM "
                      "handler replaced its own: a signal to one process stops only that one, without a checkpoint.")
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False

  def reached(self, step: int) -> bool:
    """Call after every step with the number of steps done (the same on every process)."""
    if self._synchronised:
      return self._checkpointer.reached_preemption(step)
    return self.signum is not None


def _truncate_eval_log(path: str, step: int) -> None:
  """Drops eval records after `step` (written by a run that was killed before its next checkpoint), so a
  resumed run's log equals an uninterrupted one."""
  if not files.exists(path):
    return
  lines = [line + "\n" for line in files.read_text(path).splitlines() if line.strip()]
  keep = [line for line in lines if json.loads(line)["step"] <= step]
  if len(keep) != len(lines):
    files.write_text_atomic(path, "".join(keep))


def config_diff(saved: dict, current: dict, ignore=RESUME_SAFE_FIELDS, defaults: dict | None = None) -> list[str]:
  """Lines `field: saved -> current` for every flattened field that differs, except `ignore` and, with
  `defaults` (a default config as JSON data), fields the saved config predates that hold their default value."""
  a, b, d = _flatten(saved), _flatten(current), _flatten(defaults or {})
  added_at_default = lambda k: k not in a and k in d and b.get(k) == d[k]
  return [f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k) and not added_at_default(k)]


def _default_config_json() -> dict:
  """configs/default.py as JSON data (every field at its default), or {} outside a source checkout."""
  from semi_jax import config_files
  try:
    return json.loads(config_files.load(config_files.repo_config("default")).to_json())
  except ValueError:
    return {}


def check_workdir_config(config, workdir: str) -> None:
  """Writes workdir/config.json at the first start; later starts must match it up to RESUME_SAFE_FIELDS
  unless config.allow_config_change (then the new config replaces the saved one)."""
  path = files.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  saved = files.read_json(path)
  if saved is not None:
    # A field added to semi_jax since the run started, at its default, changes nothing: the run resumes.
    diff = config_diff(saved, current, defaults=_default_config_json())
    if diff and not config.allow_config_change:
      raise config_validation.ConfigError(
          f"workdir {workdir} holds a run with a different config ({path}):\n" + "\n".join(diff) +
          "\nUse a new --workdir, or pass --config.allow_config_change=True to resume with the new values.")
    if diff:
      logging.warning("Resuming %s with a changed config:\n%s", workdir, "\n".join(diff))
  if jax.process_index() == 0:
    files.write_json_atomic(path, current, sort_keys=True)


def train_and_evaluate(config, workdir: str) -> dict:
  return Trainer(config, workdir).run()
