"""train_and_evaluate(config, workdir): set-up, the training loop, evaluation, logging and checkpoints.

Everything heavy happens in the two jitted functions of `train_step`; this loop only feeds batches, merges
metrics on device and, every N steps, logs, evaluates and checkpoints. Only process 0 writes logs.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from semi_jax import checkpointing, config_validation, datasets, input_pipeline, memory_bank, metrics, sharding
from semi_jax.models import create_model
from semi_jax.state import create_train_state, make_optimizer
from semi_jax.train_step import StepContext, eval_step, train_step

EVAL_LOG = "eval.jsonl"
SUMMARY = "summary.json"


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
    config_validation.validate(config)
    self.config = config
    self.workdir = workdir
    self.is_lead = jax.process_index() == 0
    t = config.train
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_divisible(t.batch_size, self.mesh, "train.batch_size")
    sharding.check_divisible(t.batch_size * t.mu, self.mesh, "train.batch_size * train.mu")
    sharding.check_divisible(t.eval_batch_size, self.mesh, "train.eval_batch_size")

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
    self.train_metrics_cls = metrics.train_metrics_collection(self.metric_keys)
    step_fn = lambda state, batch, rng: self._step_with_metrics(state, batch, rng)
    self.train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(repl, repl))
    self.eval_step = jax.jit(functools.partial(eval_step, ctx=self.ctx), out_shardings=repl)
    self.checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)

  def _step_with_metrics(self, state, batch, rng):
    state, out = train_step(state, batch, rng, self.ctx)
    return state, self.train_metrics_cls.single_from_model_output(**out)

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
      with open(os.path.join(self.workdir, EVAL_LOG), "a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")

  def run(self) -> dict:
    config, t = self.config, self.config.train
    start = self.restore()
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
    t0 = time.time()
    for step in range(start, t.total_steps):
      batch = next(batches)
      self.state, step_metrics = self.train_step(self.state, batch, self.step_rng)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      if done % t.log_every_steps == 0 or done == t.total_steps:
        values = jax.device_get(train_metrics.compute())
        writer.write_scalars(done, {f"train/{k}": v for k, v in values.items()})
        if not np.isfinite(values["loss"]):
          self.checkpointer.wait()
          raise FloatingPointError(
              f"non-finite loss at step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                               if k.startswith("loss")) +
              f". The last good checkpoint in {self.checkpointer.directory} is kept.")
        train_metrics = None
      if done % t.eval_every_steps == 0 or done == t.total_steps:
        result = self.evaluate()
        self._write_eval(writer, done, result)
      if done % t.checkpoint_every_steps == 0 or done == t.total_steps:
        self.checkpointer.save(done, self.state)
    trained = t.total_steps - start
    if result is None:  # nothing left to train: report the restored model
      result = self.evaluate()
    self.checkpointer.close()
    writer.flush()
    elapsed = time.time() - t0
    summary = self._summary(result, trained, elapsed)
    if self.is_lead:
      with open(os.path.join(self.workdir, SUMMARY), "w") as f:
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
            "trained_steps": trained_steps, "train_seconds": elapsed}

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


def train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  return Trainer(config, workdir).run()
