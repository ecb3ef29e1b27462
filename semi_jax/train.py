"""train_and_evaluate(config, workdir): the training loop, for a run alone and for runs trained together.

One loop serves both. A `Trainer` holds R runs (`members`) with their outputs (`outputs.RunOutputs`) and the
jitted functions that train them (`program.build_program`): one run alone (no run axis), or several stacked on a
leading run axis (`together.GroupTrainer`, which only sets them up differently). Fetching a value from the
devices (`fetch`) and taking one run's part of it (`take`) are the only places where the two differ. Everything
heavy happens in the jitted functions; the loop makes one dispatch per step besides the batch transfer (metrics
and the divergence guard stay on the device) and, every N steps, logs, evaluates and checkpoints. Only process 0
writes logs.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions

from semi_jax import checkpointing, config_validation, datasets, files, input_pipeline, metrics, outputs, program
from semi_jax import sharding, workdir
from semi_jax.preemption import Preemption

CONFIG_FILE = outputs.CONFIG_FILE
# Fields that may differ between the saved config of a workdir and a resuming run without
# --config.allow_config_change: they change the run's bookkeeping, where data is read from or how the program is
# laid out on the devices, not the experiment. The mesh may change: a checkpoint restores on any number of devices
# and processes (a run alone's state is replicated; a stacked state is re-padded to the new run axis).
# Not train.total_steps: the lr cosine and the ramps are functions of it, so a longer run is another experiment.
RESUME_SAFE_FIELDS = ("allow_config_change", "mesh.data_axis_size", "train.log_every_steps",
                      "train.eval_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
                      "train.print_table", "train.skip_nonfinite_steps", "train.max_nonfinite_share", "data.data_dir",
                      "data.prefetch", "together.conv", "together.overlap")


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


def local_blocks(mesh) -> int:
  """This process's devices on the mesh's data axis: the blocks of its part of a train batch."""
  mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if not mine:
    raise ValueError(f"process {jax.process_index()} owns no device of the mesh ({mesh.devices.size} devices); "
                     "every process must own devices of the mesh (sharding.make_mesh chooses them so).")
  return len(mine)


def seed_streams(configs) -> list[int]:
  """The distinct seeds of runs trained together, in order of first appearance: one input stream each (runs of
  one seed see the same batches)."""
  return list(dict.fromkeys(int(c.seed) for c in configs))


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of a trainer: its config (seed included), its workdir and a name for messages."""
  config: Any
  workdir: str
  name: str = ""  # e.g. 'beta_0.95 seed 1'

  @property
  def label(self) -> str:
    return self.name or self.workdir


class Trainer:
  """Trains its runs to train.total_steps; `run()` resumes from the newest good checkpoint and returns the run's
  summary. `Trainer(config, workdir)` is a run alone; `together.GroupTrainer` holds several runs stacked."""

  def __init__(self, config, workdir: str, mesh=None, model=None):
    try:
      mesh = mesh or sharding.make_mesh(config.mesh)
    except ValueError as e:
      raise config_validation.ConfigError(str(e)) from None
    config_validation.validate(config, num_devices=mesh.devices.size, num_processes=jax.process_count())
    self.workdir = workdir
    self._start([Member(config, workdir)], mesh, files.join(workdir, "checkpoints"), runs=None,
                slice_index=jax.process_index(), slice_count=jax.process_count(), model=model)

  # --- set-up ---------------------------------------------------------------------------------------------------

  def _start(self, members: list[Member], mesh, checkpoint_dir: str, *, runs: int | None, slice_index: int,
             slice_count: int, model=None, lease_dirs: tuple[str, ...] = ()):
    """The set-up shared by a run alone and a group: every check first, then the lease on the workdirs (one
    writer each), then data, program and state; the workdirs' config.json only once all of that is ready, so
    that a start that fails leaves nothing that changes what the next start may do."""
    self.members, self.mesh, self.runs = list(members), mesh, runs
    self.config = config = members[0].config
    self.is_lead = jax.process_index() == 0
    self.slice_index, self.slice_count = slice_index, slice_count
    self.dead: set[int] = set()  # members stopped as diverged
    self._diverged: dict[int, dict] = {}  # their summaries
    self._changes = {m.workdir: check_workdir_config(m.config, m.workdir) for m in members}
    self.leases = workdir.acquire_for_job(sorted({m.workdir for m in members} | set(lease_dirs)))
    try:
      dataset = datasets.load(config.data)
      if dataset.image_size != config.data.image_size:
        raise config_validation.ConfigError(
            f"data set {dataset.name} has {dataset.image_size}x{dataset.image_size} images but "
            f"data.image_size={config.data.image_size}; set data.image_size={dataset.image_size}.")
      self.seeds = seed_streams([m.config for m in members])
      self.stream_data = {s: input_pipeline.make_ssl_data(dataset, config.data, s) for s in self.seeds}
      self.data = self.stream_data[self.seeds[0]]  # a run alone's split
      priors = [d.class_prior for d in self.stream_data.values()]
      if any(not np.array_equal(p, priors[0]) for p in priors):
        raise ValueError(f"the seeds {self.seeds} give different labeled class counts, which a stacked program "
                         "bakes in; train these runs one after another (without --together).")
      self.num_classes = dataset.num_classes
      self.program = program.build_program(config, mesh, runs=runs, num_classes=self.num_classes,
                                           class_prior=priors[0], mean=dataset.mean, std=dataset.std, model=model)
      self._init_state()
      self.outputs = [outputs.RunOutputs(m.config, m.workdir, self.stream_data[int(m.config.seed)], m.name)
                      for m in members]
      self.checkpointer = checkpointing.Checkpointer(checkpoint_dir, config.train.keep_checkpoints,
                                                     runs=None if runs is None else len(members))
      for m in members:
        write_workdir_config(m.config, m.workdir)
    except BaseException:
      self.leases.release()
      raise

  def _init_state(self):
    """The initial state and the step's per-run inputs of a run alone (a group's: `together.GroupTrainer`)."""
    rng = jax.random.key(self.config.seed)
    self.state = self.program.init_state(jax.random.fold_in(rng, 0))
    self.step_inputs = self.step_rng = jax.random.fold_in(rng, 1)

  # --- what differs between a run alone and a group ----------------------------------------------------------------

  def fetch(self, tree):
    """Device values on the host, whole."""
    return jax.device_get(tree)

  def take(self, tree, r: int):
    """Member r's part of a fetched value."""
    del r
    return tree

  def put(self, batches: list[dict]):
    """This process's batches of the streams (numpy) as the train step's global batch."""
    return sharding.to_global(batches[0], self.mesh)

  def eval_index(self, index):
    """The per-run index into the stream axis of an eval batch (unused by a run alone)."""
    del index
    return None

  # --- input --------------------------------------------------------------------------------------------------

  def train_batches(self, start: int):
    """This process's train batches from step `start` on, one per input stream, as numpy arrays laid out for the
    mesh."""
    blocks = self.mesh.shape[sharding.DATA_AXIS] // self.slice_count if self.stacked else local_blocks(self.mesh)
    member = {int(m.config.seed): m.config for m in reversed(self.members)}  # a stream's config: any of its runs
    iters = [input_pipeline.as_numpy(input_pipeline.train_dataset(
        self.stream_data[s], member[s], start_step=start, process_index=self.slice_index,
        process_count=self.slice_count,
        blocks=blocks, views_on_device=self.program.views_on_device)) for s in self.seeds]
    for batches in zip(*iters):
      yield list(batches)

  @property
  def stacked(self) -> bool:
    return self.runs is not None

  # --- evaluation ---------------------------------------------------------------------------------------------

  def _evaluate_sets(self, sets: list[tuple[np.ndarray, np.ndarray]], index) -> list[dict]:
    """Per-member summaries over image sets of equal size, one set per stream index (member r: sets[index[r]])."""
    iters = [input_pipeline.eval_batches(images, labels, self.config.train.eval_batch_size,
                                         process_index=self.slice_index, process_count=self.slice_count)
             for images, labels in sets]
    index = self.eval_index(index)
    sums = None
    for batches in zip(*iters):
      out = self.program.eval_step(self.state.ema_params, self.state.batch_stats, self.put(list(batches)), index)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = self.fetch(sums)
    return [o.summarize(self.take(sums, r)) for r, o in enumerate(self.outputs)]

  def evaluate(self) -> list[dict]:
    """Per member: test-set summaries of both heads on the EMA weights, and under "validation" the same for the
    held-out validation set (data.val_per_class > 0)."""
    first = self.data
    d = first.dataset
    test = self._evaluate_sets([(d.test_images, d.test_labels)], [0] * (self.runs or 1))
    val = [None] * len(self.members)
    if len(first.val_idx):
      val = self._evaluate_sets([self.stream_data[s].validation_set() for s in self.seeds], self.stream_index())
    return [o.eval_result(t, v) for o, t, v in zip(self.outputs, test, val)]

  def stream_index(self) -> list[int]:
    """Each (padded) run's input stream."""
    return [0]

  # --- checkpoints ----------------------------------------------------------------------------------------------

  def restore(self) -> int:
    """Restores the newest good checkpoint into `state`; returns its step (0 without one)."""
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
    try:
      restored = self.checkpointer.restore(template)
    except checkpointing.CheckpointMismatchError as e:
      raise checkpointing.CheckpointMismatchError(f"{e}{self._config_changes()}") from None
    if restored is None:
      return 0
    step, state = restored
    if state.guard is None:  # written before the guard was part of the state
      state = state.replace(guard=self.state.guard)
    self.state = state
    self.dead = {r for r, d in enumerate(self._guard()["diverged_step"]) if d >= 0}
    return step

  def _config_changes(self) -> str:
    changes = [line for m in self.members for line in self._changes.get(m.workdir, [])]
    return (" Config fields changed since the run started (--config.allow_config_change):\n" + "\n".join(changes)
            if changes else "")

  def _guard(self) -> dict:
    """The members' guards on the host: {field: [per member]}."""
    g = self.fetch(self.state.guard)
    per_run = lambda x: [self.take(x, r) for r in range(len(self.members))]
    return {"diverged_step": [int(v) for v in per_run(g.diverged_step)],
            "first_bad_step": [int(v) for v in per_run(g.first_bad_step)],
            "skipped": [int(v) for v in per_run(g.skipped)],
            "terms": [{k: float(self.take(v, r)) for k, v in g.terms.items()} for r in range(len(self.members))]}

  # --- training -----------------------------------------------------------------------------------------------

  def _check_divergence(self, done: int, start: int) -> dict:
    """Reads the guards; reports every member that diverged since the last check (summary.json with status
    diverged; the run's last good checkpoint is kept). Returns the guards."""
    g = self._guard()
    for r, m in enumerate(self.members):
      if r in self.dead or g["diverged_step"][r] < 0:
        continue
      self.dead.add(r)
      message = self._divergence_message(m, r, g)
      logging.error("%s", message)
      self._diverged[r] = self.outputs[r].diverged(
          step=g["diverged_step"][r], terms=g["terms"][r], skipped_steps=g["skipped"][r], trained_steps=done - start,
          checkpoint=self._last_checkpoint(), message=message)
    return g

  def _diverged_before(self, r: int, guard: dict) -> dict:
    """The summary of a member that had diverged before this start (its state restored frozen)."""
    summary = files.read_json(files.join(self.members[r].workdir, outputs.SUMMARY), strict=False)
    if isinstance(summary, dict) and summary.get("status") == outputs.DIVERGED:
      return summary
    return self.outputs[r].diverged(step=guard["diverged_step"][r], terms=guard["terms"][r],
                                    skipped_steps=guard["skipped"][r], trained_steps=0,
                                    checkpoint=self._last_checkpoint(),
                                    message=self._divergence_message(self.members[r], r, guard))

  def _last_checkpoint_step(self) -> int | None:
    """The step of the newest checkpoint, once the saves in flight are written."""
    self.checkpointer.wait()
    return self.checkpointer.latest_step()

  def _last_checkpoint(self) -> str | None:
    step = self._last_checkpoint_step()
    return None if step is None else self.checkpointer.path(step)

  def _divergence_message(self, m: Member, r: int, g: dict) -> str:
    t = m.config.train
    terms = ", ".join(f"{k}={v:.4g}" for k, v in g["terms"][r].items())
    if t.skip_nonfinite_steps:
      cause = (f"skipped {g['skipped'][r]} steps with a non-finite loss or gradients, more than "
               f"{t.max_nonfinite_share:g} of its last {t.nonfinite_window} steps, at step {g['diverged_step'][r]} "
               f"(the first at step {g['first_bad_step'][r]}: {terms})")
    else:
      cause = f"non-finite loss or gradients at step {g['diverged_step'][r]}: {terms}"
    step = self._last_checkpoint_step()
    kept = (f"its last good checkpoint (step {step}) in {self.checkpointer.directory} is kept" if step is not None
            else "no checkpoint was written before it, so a rerun starts from step 0")
    rest = "; the other runs of the group go on" if self.stacked and len(self.members) > 1 else ""
    return (f"run {m.label} diverged: {cause}. Training of this run stopped; {kept}{rest}. Lower its optim.lr, or set "
            "train.skip_nonfinite_steps=True to skip such steps.")

  def run(self, batches=None):
    """Trains from the newest good checkpoint to train.total_steps; returns the run's summary (a group: one per
    member). SIGTERM / SIGINT finish the current step, write a checkpoint and return early (summary["preempted"]
    is True); the next run resumes there. A run alone that diverges raises FloatingPointError after writing its
    summary (status diverged); a member of a group that diverges stops there while the others go on.

    `batches` replaces the input pipeline by an iterator of this process's batches, one per stream (benchmarks
    of the loop)."""
    try:
      summaries = self._run(batches)
    except BaseException:
      self._finish_saves_in_flight()
      raise
    finally:
      self.leases.release()  # after the saves in flight: another run must not take a workdir still written
    if not self.stacked:
      summary = summaries[0]
      if summary.get("status") == outputs.DIVERGED:
        raise FloatingPointError(summary["message"])
      return summary
    return summaries

  def _finish_saves_in_flight(self):
    """A run that fails keeps the checkpoints it already started (they are complete, good states) and ends its
    writer threads before the error is reported, so that nothing is logged after the error's line."""
    try:
      self.checkpointer.close()
    except Exception as e:  # noqa: BLE001 - the error that stopped the run is the one to report
      logging.warning("a checkpoint save in flight failed while the run stopped: %s", e)

  def _run(self, batches) -> list[dict]:
    config, t = self.config, self.config.train
    start = self.restore()
    for r, o in enumerate(self.outputs):
      o.open(start)
    hooks = [periodic_actions.ReportProgress(num_train_steps=t.total_steps, writer=o.events,
                                             every_steps=t.log_every_steps)
             for o in self.outputs] if self.is_lead else []
    batches = prefetch(self.train_batches(start) if batches is None else batches, self.put, config.data.prefetch)
    # Held by the trainer, not only by this frame: destroying a tf.data iterator waits for its worker threads'
    # augmentation in flight (seconds on a busy host), which a preempted process skips (see main).
    self.input = batches
    train_step, results, preempted, done = self.program.train_step, None, False, start
    carry = self.program.init_carry()
    t0 = time.time()
    live = lambda: [r for r in range(len(self.members)) if r not in self.dead]
    with Preemption(self.checkpointer) as preemption:
      # Logged once signals are caught: from here on a signal stops the run at a step boundary, with a checkpoint.
      logging.info("Training from step %d to %d on %d devices (%d processes), mesh %s: %s; labeled per class %s",
                   start, t.total_steps, self.mesh.devices.size, jax.process_count(), dict(self.mesh.shape),
                   f"{len(self.members)} runs together ({len(self.seeds)} input streams), varying "
                   f"{', '.join(getattr(self, 'varying', ())) or 'nothing but the seed'}" if self.stacked
                   else "one run",
                   self.data.labeled_counts.tolist())
      for step in range(start, t.total_steps):
        if not live():
          break
        # The only dispatch of a step: metrics and the divergence guard stay on the device until a log step.
        self.state, carry = train_step(self.state, carry, next(batches), self.step_inputs)
        done = step + 1
        stop = preemption.reached(done)
        for r in live():
          if hooks:
            hooks[r](done)
        log = done % t.log_every_steps == 0 or done == t.total_steps
        evaluate = done % t.eval_every_steps == 0 or done == t.total_steps
        save = stop or done % t.checkpoint_every_steps == 0 or done == t.total_steps
        if log or evaluate or save:  # never evaluate or save a run that diverged before noticing it
          self.leases.check()  # on gs://: stop before writing if another run took the workdir over
          guard = self._check_divergence(done, start)
          if not live():
            break
        if log:
          host = self.fetch(carry["metrics"])
          for r in live():
            with np.errstate(invalid="ignore"):  # NaN averages where every step of the interval was skipped
              values = {k: float(v) for k, v in self.take(host, r).compute().items()}
            values["skipped_steps"] = guard["skipped"][r]
            self.outputs[r].write_train(done, values)
          carry = self.program.reset_metrics(carry)
        if evaluate:
          results = self.evaluate()
          # Pseudo-label quality since the previous evaluation (one read of the on-device sums).
          counts = self.fetch(self.state.semi.pseudo_counts)
          self.state = self.program.reset_pseudo_counts(self.state)  # before a save at this step: resume-exact
          bank = self.fetch(self.program.bank_stats(self.state))
          for r in live():
            results[r]["pseudo_labels"] = metrics.pseudo_label_summary(self.take(counts, r))
            self.outputs[r].write_eval(done, results[r], self.take(bank, r))
        if save and (self.stacked or not self.dead):
          self.checkpointer.save(done, self.state, force=stop)
        if stop:
          preempted = True
          cause = f"signal {preemption.signum}" if preemption.signum else "a preemption notice"
          logging.warning("Received %s: stopped after step %d and saved a checkpoint (every process stops at "
                          "this step); rerun the same command to resume.", cause, done)
          break
    self.checkpointer.close()
    elapsed = time.time() - t0
    guard = self._guard()
    summaries = []
    if results is None and not preempted and live():  # nothing left to train: report the restored model
      results = self.evaluate()
    for r, (m, o) in enumerate(zip(self.members, self.outputs)):
      if r in self.dead:
        summaries.append(self._diverged.get(r) or self._diverged_before(r, guard))
      elif preempted:
        summaries.append({"step": done, "trained_steps": done - start, "preempted": True, "train_seconds": elapsed})
      else:
        summaries.append(o.finish(results[r], step=done, trained_steps=done - start,
                                  skipped_steps=guard["skipped"][r], elapsed=elapsed))
      o.close()
    return summaries


def config_diff(saved: dict, current: dict, ignore=RESUME_SAFE_FIELDS, defaults: dict | None = None) -> list[str]:
  """Lines `field: saved -> current` for every flattened field that differs, except `ignore` and, with
  `defaults` (a default config as JSON data), fields the saved config predates that hold their default value."""
  a, b, d = outputs.flatten(saved), outputs.flatten(current), outputs.flatten(defaults or {})
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


def check_workdir_config(config, workdir: str) -> list[str]:
  """Refuses a workdir whose config.json (written at the first start) differs from `config` beyond
  RESUME_SAFE_FIELDS, unless config.allow_config_change; returns the differing fields. Writes nothing."""
  path = files.join(workdir, CONFIG_FILE)
  saved = files.read_json(path) if files.isdir(workdir) else None
  if saved is None:
    return []
  # A field added to semi_jax since the run started, at its default, changes nothing: the run resumes.
  diff = config_diff(saved, json.loads(config.to_json()), defaults=_default_config_json())
  if diff and not config.allow_config_change:
    raise config_validation.ConfigError(
        f"workdir {workdir} holds a run with a different config ({path}):\n" + "\n".join(diff) +
        "\nUse a new --workdir, or pass --config.allow_config_change=True to resume with the new values.")
  if diff:
    logging.warning("Resuming %s with a changed config:\n%s", workdir, "\n".join(diff))
  return diff


def write_workdir_config(config, workdir: str) -> None:
  """Writes workdir/config.json (process 0): the config the run trains with from now on."""
  if jax.process_index() == 0:
    files.makedirs(workdir)
    files.write_json_atomic(files.join(workdir, CONFIG_FILE), json.loads(config.to_json()), sort_keys=True)


def train_and_evaluate(config, workdir: str) -> dict:
  return Trainer(config, workdir).run()
