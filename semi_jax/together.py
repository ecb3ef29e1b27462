"""Runs trained together: several runs of one program structure as ONE jitted program with a leading run axis.

One SeMi run of the papers' size uses a few per cent of a modern accelerator, and spreading it over many chips
leaves each a handful of images. An ablation sweep instead stacks its runs:

- the train state (parameters, optimiser state, EMA, BatchNorm statistics, memory bank, monitor, consistency
  centre, step) gets a leading run axis, and one `jax.vmap`-ed step trains every run;
- the fields in which the runs differ (every schedule, kinds included, and the scalar hyper-parameters of
  `hyperparams.SCALAR_FIELDS`) are per-run array inputs of the step, traced, not baked in; runs that differ in
  anything else (shapes, component switches, the algorithm, the data) are different programs: `plan_groups`
  splits them into as few groups as possible;
- runs with the same seed share one input stream (the same batches: common random numbers), so the host's input
  cost grows with the number of seeds, not of variants;
- the mesh has a `run` axis beside the `data` axis: runs are sharded over `run`, each run's batch over `data`
  (`choose_axes`), from one device (all runs vmapped on it) to a multi-host slice.

Every run still gets its own workdir with config.json, eval.jsonl, summary.json and TensorBoard events
(`train.RunOutputs`); the stacked state is checkpointed in the group's own directory.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semi_jax import checkpointing, config_validation, datasets, files, hyperparams, input_pipeline, metrics
from semi_jax import semi_state, sharding, train
from semi_jax import train_step as steps
from semi_jax.state import create_train_state, make_optimizer

RUN_AXIS = "run"
# The smallest labeled batch per device the automatic split gives a run (unless the whole batch is smaller):
# below it a device's share of the step is too small to keep it busy, and BatchNorm still sees the global batch
# but each device's work is dominated by fixed costs.
MIN_DEVICE_BATCH = 16
GROUP_FILE = "group.json"


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of a group: its config (seed included) and its workdir."""
  config: Any
  workdir: str
  name: str = ""  # for messages, e.g. 'beta_0.95 seed 1'


def plan_groups(configs) -> list[list[int]]:
  """Indices of `configs` grouped by program structure (`hyperparams.structure`), in order of first appearance:
  the fewest groups in which every run can be stacked with the others."""
  groups: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    groups.setdefault(hyperparams.structure(config), []).append(i)
  return list(groups.values())


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def choose_axes(num_devices: int, num_runs: int, batch_size: int, run_axis_size: int = -1,
                devices_per_process: int | None = None) -> tuple[int, int]:
  """(run axis size, data axis size) of a mesh over all `num_devices` for `num_runs` stacked runs.

  A given `run_axis_size` (> 0) must divide the devices. Automatic (-1): the split with the least work per device
  and step (ceil(runs / run axis) runs of batch_size / data axis images each), keeping the per-device labeled
  batch >= MIN_DEVICE_BATCH where the batch allows; ties go to the smaller data axis (fewer collectives). With
  several processes a data axis must divide a process's devices or be a multiple of them, so that every
  process feeds whole, equal slices of the batch.
  """
  per_process = devices_per_process or num_devices

  def valid(d):
    return num_devices % d == 0 and batch_size % d == 0 and (per_process % d == 0 or d % per_process == 0)

  if run_axis_size != -1:
    if run_axis_size < 1 or num_devices % run_axis_size:
      raise config_validation.ConfigError(
          f"run axis size {run_axis_size} does not divide the {num_devices} devices; choose one of "
          f"{_divisors(num_devices)} or -1 (automatic).")
    d = num_devices // run_axis_size
    if not valid(d):
      raise config_validation.ConfigError(
          f"run axis size {run_axis_size} leaves a data axis of {d} devices, which train.batch_size={batch_size} "
          f"(or the processes' {per_process} devices each) cannot be split over; valid run axis sizes: "
          f"{[num_devices // k for k in _divisors(num_devices) if valid(k)]}.")
    return run_axis_size, d
  candidates = [d for d in _divisors(num_devices) if valid(d) and (d == 1 or batch_size // d >= MIN_DEVICE_BATCH)]
  d = min(candidates, key=lambda d: (-(-num_runs // (num_devices // d)) * batch_size / d, d))
  return num_devices // d, d


def make_mesh(run_axis_size: int, data_axis_size: int, devices=None) -> Mesh:
  """A (run, data) mesh over `devices` (default: all), rows of `data_axis_size` consecutive devices (a process's
  devices are consecutive, so a row never straddles processes when the data axis fits in one)."""
  devices = list(jax.devices() if devices is None else devices)
  if run_axis_size * data_axis_size != len(devices):
    raise ValueError(f"a {run_axis_size} x {data_axis_size} mesh needs {run_axis_size * data_axis_size} devices, "
                     f"got {len(devices)}.")
  grid = np.asarray(devices, dtype=object).reshape(run_axis_size, data_axis_size)
  return Mesh(grid, (RUN_AXIS, sharding.DATA_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def data_slice(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process feeds the index-th of `count` equal slices of every batch along the data axis
  (the positions of its devices on that axis; processes on the same positions feed the same slice)."""
  axis = mesh.axis_names.index(sharding.DATA_AXIS)
  mine = sorted({idx[axis] for idx, d in np.ndenumerate(mesh.devices) if d.process_index == jax.process_index()})
  size = mesh.devices.shape[axis]
  if not mine or mine != list(range(mine[0], mine[0] + len(mine))) or size % len(mine) or mine[0] % len(mine):
    raise ValueError(f"process {jax.process_index()} holds data-axis positions {mine} of {size}: every process "
                     "must hold an aligned, equal range of them (see choose_axes).")
  return mine[0] // len(mine), size // len(mine)


@dataclasses.dataclass(frozen=True)
class StackedProgram:
  """The jitted functions of a group of runs on a (run, data) mesh.

  init_state(keys[R]) -> state; init_carry() -> carry; train_step(state, carry, batch[S], rngs[R], hp[R],
  seed_index[R]) -> (state, carry), donating state and carry; reset_metrics, reset_pseudo_counts as in
  `train.Program`; eval_step(params[R], batch_stats[R], batch[S'], index[R]) -> sums[R]. A batch has a leading
  axis of streams (one per seed); run r reads stream seed_index[r]."""
  ctx: steps.StepContext
  runs: int  # R, padded to a multiple of the run axis
  compiler_options: dict
  metrics_cls: Any
  init_state: Callable
  init_carry: Callable
  train_step: Callable
  reset_metrics: Callable
  reset_pseudo_counts: Callable
  eval_step: Callable


def _global(tree, sharding):
  """Host values that every process holds in full as global arrays laid out by `sharding` (which may span
  devices of other processes, where device_put cannot go)."""
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
                      tree)


def _fetch(tree):
  """Run-sharded arrays on the host, whole (the run axis may span processes: then gathered from all of them, a
  collective every process makes at the same point)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _take(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def _run_step(state, carry, rng, hp, seed_index, batch, *, ctx, metrics_cls, skip_nonfinite):
  """One run's guarded step with its own hyper-parameters `hp` (traced) and its seed's stream of `batch`."""
  if hp:
    config = hyperparams.bind(ctx.config, hp)
    ctx = dataclasses.replace(ctx, config=config, tx=make_optimizer(config))
  return steps.guarded_step(state, carry, _take(batch, seed_index), rng, ctx, metrics_cls, skip_nonfinite)


def build_stacked_program(config, mesh: Mesh, runs: int, *, num_classes: int, class_prior, mean,
                          std) -> StackedProgram:
  """Builds (without compiling) the group's functions. `config` is any member's config: the fields that vary
  within the group are read from the step's `hp` input instead."""
  ctx, _, options = train.step_context(config, mesh, num_classes=num_classes, class_prior=class_prior, mean=mean,
                                       std=std)
  model = ctx.model
  by_run = NamedSharding(mesh, P(RUN_AXIS))
  jit = functools.partial(jax.jit, compiler_options=options or None)
  vmap = functools.partial(jax.vmap, spmd_axis_name=RUN_AXIS)
  init_one = functools.partial(create_train_state, model, ctx.tx, image_size=config.data.image_size,
                               num_classes=num_classes, bank_size=config.bank.size, bank_dtype=config.bank.dtype)
  one_state = jax.eval_shape(init_one, jax.random.key(0))
  batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                       train.batch_spec(config, mesh, ctx.augment is not None))
  out_shape = jax.eval_shape(functools.partial(steps.train_step, ctx=ctx), one_state, batch, jax.random.key(0))[1]
  metrics_cls = metrics.train_metrics_collection(out_shape)
  loss_keys = tuple(k for k in sorted(out_shape) if k.startswith("loss"))
  stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (runs,) + jnp.shape(x)), tree)
  run_step = functools.partial(_run_step, ctx=ctx, metrics_cls=metrics_cls,
                               skip_nonfinite=config.train.skip_nonfinite_steps)

  def train_step_fn(state, carry, batch, rngs, hp, seed_index):
    return vmap(run_step, in_axes=(0, 0, 0, 0, 0, None))(state, carry, rngs, hp, seed_index, batch)

  def eval_fn(params, batch_stats, batch, index):
    one = lambda p, b, i: steps.eval_step(p, b, _take(batch, i), ctx)
    return vmap(one)(params, batch_stats, index)

  def reset_counts(state):
    empty = stack(semi_state.empty_pseudo_counts(num_classes))
    return state.replace(semi=state.semi.replace(pseudo_counts=empty))

  return StackedProgram(
      ctx=ctx, runs=runs, compiler_options=options, metrics_cls=metrics_cls,
      init_state=jit(vmap(init_one), out_shardings=by_run),
      init_carry=jit(lambda: stack(steps.init_carry(metrics_cls, loss_keys)), out_shardings=by_run),
      train_step=jit(train_step_fn, donate_argnums=(0, 1), out_shardings=(by_run, by_run)),
      reset_metrics=jit(lambda carry: {**carry, "metrics": stack(metrics_cls.empty())}, donate_argnums=0,
                        out_shardings=by_run),
      reset_pseudo_counts=jit(reset_counts, donate_argnums=0, out_shardings=by_run),
      eval_step=jit(eval_fn, out_shardings=by_run))


def _seed_streams(members) -> list[int]:
  """The distinct seeds of the members, in order of first appearance (one input stream each)."""
  return list(dict.fromkeys(int(m.config.seed) for m in members))


class GroupTrainer:
  """Trains the members of one group (equal `hyperparams.structure`) together; `run()` trains to the end."""

  def __init__(self, members: list[Member], group_dir: str, mesh: Mesh):
    if not members:
      raise ValueError("a group needs at least one run.")
    structures = {hyperparams.structure(m.config) for m in members}
    if len(structures) > 1:
      raise ValueError("the runs of a group must share their structure (hyperparams.structure); plan_groups "
                       "splits a sweep into such groups.")
    self.members, self.group_dir, self.mesh = list(members), group_dir, mesh
    self.is_lead = jax.process_index() == 0
    self.config = config = members[0].config
    runs_axis, data_axis = mesh.shape[RUN_AXIS], mesh.shape[sharding.DATA_AXIS]
    self.slice_index, self.slice_count = data_slice(mesh)
    for m in members:
      try:
        config_validation.validate(m.config, num_devices=data_axis, num_processes=self.slice_count)
      except ValueError as e:
        raise config_validation.ConfigError(f"{m.name or m.workdir}: {e}") from None
    # Every check runs before a workdir is touched.
    self._check_group_dir()
    for m in members:
      files.makedirs(m.workdir)
      train.check_workdir_config(m.config, m.workdir)

    dataset = datasets.load(config.data)
    if dataset.image_size != config.data.image_size:
      raise ValueError(f"data set {dataset.name} has {dataset.image_size}x{dataset.image_size} images but "
                       f"data.image_size={config.data.image_size}; set data.image_size={dataset.image_size}.")
    self.seeds = _seed_streams(members)
    self.data = {s: input_pipeline.make_ssl_data(dataset, config.data, s) for s in self.seeds}
    priors = {s: d.class_prior for s, d in self.data.items()}
    if any(not np.array_equal(p, priors[self.seeds[0]]) for p in priors.values()):
      raise ValueError(f"the seeds {self.seeds} give different labeled class counts, which a stacked program "
                       "bakes in; train these runs one after another (without --together).")
    self.outputs = [train.RunOutputs(m.config, m.workdir, self.data[m.config.seed]) for m in members]
    self.num_classes = dataset.num_classes

    # Padded to a multiple of the run axis with copies of the last member: trained, never reported.
    n = len(members)
    self.runs = -(-n // runs_axis) * runs_axis
    padded = [members[min(i, n - 1)] for i in range(self.runs)]
    self.varying = hyperparams.varying([m.config for m in members])
    by_run = NamedSharding(mesh, P(RUN_AXIS))
    hp = [hyperparams.values(m.config, self.varying) for m in padded]
    self.hp = _global(jax.tree.map(lambda *xs: np.stack(xs), *hp) if self.varying else {}, by_run)
    self.seed_index_host = np.asarray([self.seeds.index(m.config.seed) for m in padded], np.int32)
    self.seed_index = _global(self.seed_index_host, by_run)
    self.program = build_stacked_program(config, mesh, self.runs, num_classes=self.num_classes,
                                         class_prior=priors[self.seeds[0]], mean=dataset.mean, std=dataset.std)
    # Each run's keys as a run alone makes them: fold_in(key(seed), 0) initialises, fold_in(key(seed), 1) steps.
    seeds = np.asarray([m.config.seed for m in padded], np.int32)
    keys = lambda salt: jax.jit(lambda: jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), salt))(seeds),
                                out_shardings=by_run)()
    self.state = self.program.init_state(keys(0))
    self.step_rngs = keys(1)
    self.checkpointer = checkpointing.Checkpointer(files.join(group_dir, "checkpoints"),
                                                   config.train.keep_checkpoints)

  def _manifest(self) -> dict:
    return {"runs": [{"name": m.name, "workdir": m.workdir, "seed": int(m.config.seed)} for m in self.members]}

  def _check_group_dir(self) -> None:
    """A group directory belongs to one list of runs: its checkpoint is never restored into other runs."""
    path = files.join(self.group_dir, GROUP_FILE)
    saved = files.read_json(path, strict=False)
    if saved is not None and saved != self._manifest():
      raise config_validation.ConfigError(
          f"{self.group_dir} holds the checkpoint of another group of runs ({path}); use another --workdir or "
          "delete that directory.")
    files.makedirs(self.group_dir)
    if self.is_lead:
      files.write_json_atomic(path, self._manifest())

  # --- input --------------------------------------------------------------------------------------------------

  def _stacked_put(self, batches: list[dict]):
    """Per-stream local batches (numpy) -> one global array per key with a leading stream axis."""
    spec = NamedSharding(self.mesh, P(None, sharding.DATA_AXIS))
    out = {}
    for k in batches[0]:
      local = np.stack([b[k] for b in batches])
      shape = (local.shape[0], local.shape[1] * self.slice_count) + local.shape[2:]
      out[k] = jax.make_array_from_process_local_data(spec, local, shape)
    return out

  def train_batches(self, start: int):
    blocks = self.mesh.shape[sharding.DATA_AXIS] // self.slice_count
    member = {m.config.seed: m.config for m in reversed(self.members)}  # the stream of a seed: any of its runs
    iters = [input_pipeline.as_numpy(input_pipeline.train_dataset(
        self.data[s], member[s], start_step=start, process_index=self.slice_index, process_count=self.slice_count,
        blocks=blocks, views_on_device=self.program.ctx.augment is not None)) for s in self.seeds]
    for batches in zip(*iters):
      yield list(batches)

  # --- evaluation ---------------------------------------------------------------------------------------------

  def _evaluate_sets(self, sets: list[tuple[np.ndarray, np.ndarray]], index) -> list[dict]:
    """Per-member summaries over image sets of equal size, one set per stream index (run r: sets[index[r]])."""
    index = _global(np.asarray(index, np.int32), NamedSharding(self.mesh, P(RUN_AXIS)))
    iters = [input_pipeline.eval_batches(images, labels, self.config.train.eval_batch_size,
                                         process_index=self.slice_index, process_count=self.slice_count)
             for images, labels in sets]
    sums = None
    for batches in zip(*iters):
      out = self.program.eval_step(self.state.ema_params, self.state.batch_stats, self._stacked_put(list(batches)),
                                   index)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = _fetch(sums)
    return [o.summarize(_take(sums, r)) for r, o in enumerate(self.outputs)]

  def evaluate(self) -> list[dict]:
    d = self.data[self.seeds[0]].dataset
    test = self._evaluate_sets([(d.test_images, d.test_labels)], [0] * self.runs)
    val = [None] * len(self.members)
    if len(self.data[self.seeds[0]].val_idx):
      val = self._evaluate_sets([self.data[s].validation_set() for s in self.seeds],
                                self.seed_index_host)
    return [o.eval_result(t, v) for o, t, v in zip(self.outputs, test, val)]

  # --- training -----------------------------------------------------------------------------------------------

  def restore(self) -> int:
    # Read as a replicated copy, whatever the run axis: each process verifies its own full copy without any
    # collective (see checkpointing), then the runs are spread over the run axis again.
    repl = sharding.replicated(self.mesh)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), self.state)
    restored = self.checkpointer.restore(template)
    if restored is not None:
      self.state = jax.device_put(restored, NamedSharding(self.mesh, P(RUN_AXIS)))
    return int(_fetch(self.state.step)[0])

  def _check_guard(self, carry) -> np.ndarray:
    g = _fetch(carry["guard"])
    for r, m in enumerate(self.members):
      if int(g["first_bad_step"][r]) >= 0 and not self.config.train.skip_nonfinite_steps:
        self.checkpointer.wait()
        terms = ", ".join(f"{k}={float(v[r]):.4g}" for k, v in g["terms"].items())
        raise FloatingPointError(
            f"run {m.name or m.workdir}: non-finite loss or gradients at step {int(g['first_bad_step'][r])}: "
            f"{terms}. The group stopped; its last good checkpoint (step {self.checkpointer.latest_step()}) in "
            f"{self.checkpointer.directory} is kept. Lower that run's optim.lr, set "
            "train.skip_nonfinite_steps=True, or train it without --together.")
    return g["skipped"]

  def run(self) -> list[dict]:
    """Trains every member to train.total_steps (resuming from the group's checkpoint); returns their summaries
    (or, when preempted, one {"preempted": True, ...} per member)."""
    t = self.config.train
    start = self.restore()
    writers = []
    for m, o in zip(self.members, self.outputs):
      if self.is_lead:
        train._truncate_eval_log(files.join(m.workdir, train.EVAL_LOG), start)
      writer = metric_writers.create_default_writer(m.workdir, just_logging=not self.is_lead, asynchronous=True)
      if start == 0:
        writer.write_hparams(dict(train._flatten(m.config.to_dict())))
      writers.append(writer)
    hooks = [periodic_actions.ReportProgress(num_train_steps=t.total_steps, writer=w, every_steps=t.log_every_steps)
             for w in writers] if self.is_lead else []
    batches = train.prefetch(self.train_batches(start), self._stacked_put, self.config.data.prefetch)
    self.input = batches
    carry, results, preempted = self.program.init_carry(), None, False
    t0 = time.time()
    with train._Preemption(self.checkpointer) as preemption:
      logging.info("Training %d runs together (%d input streams) from step %d to %d on a %s mesh; varying: %s",
                   len(self.members), len(self.seeds), start, t.total_steps, dict(self.mesh.shape),
                   ", ".join(self.varying) or "nothing but the seed")
      for step in range(start, t.total_steps):
        self.state, carry = self.program.train_step(self.state, carry, next(batches), self.step_rngs, self.hp,
                                                    self.seed_index)
        done = step + 1
        stop = preemption.reached(done)
        for hook in hooks:
          hook(done)
        if done % t.log_every_steps == 0 or done == t.total_steps:
          skipped = self._check_guard(carry)
          host = _fetch(carry["metrics"])
          for r, w in enumerate(writers):
            with np.errstate(invalid="ignore"):
              values = {k: float(v) for k, v in _take(host, r).compute().items()}
            values["skipped_steps"] = int(skipped[r])
            w.write_scalars(done, {f"train/{k}": v for k, v in values.items()})
          carry = self.program.reset_metrics(carry)
        if done % t.eval_every_steps == 0 or done == t.total_steps:
          results = self.evaluate()
          counts = _fetch(self.state.semi.pseudo_counts)
          self.state = self.program.reset_pseudo_counts(self.state)
          bank = _fetch(self.state.semi.bank)
          for r, (o, w, result) in enumerate(zip(self.outputs, writers, results)):
            result["pseudo_labels"] = metrics.pseudo_label_summary(_take(counts, r))
            o.write_eval(w, done, result, _take(bank, r))
        if stop or done % t.checkpoint_every_steps == 0 or done == t.total_steps:
          self._check_guard(carry)
          self.checkpointer.save(done, self.state, force=stop)
        if stop:
          preempted = True
          logging.warning("Received a stop signal: stopped the group after step %d and saved a checkpoint; rerun "
                          "the same command to resume.", done)
          break
    step_now = int(_fetch(self.state.step)[0])
    skipped = self._check_guard(carry) if not preempted else _fetch(carry["guard"]["skipped"])
    self.checkpointer.close()
    elapsed = time.time() - t0
    for w in writers:
      w.flush()
    if preempted:
      return [{"step": step_now, "trained_steps": step_now - start, "preempted": True, "train_seconds": elapsed}
              for _ in self.members]
    if results is None:
      results = self.evaluate()
    return [o.finish(result, step=step_now, trained_steps=step_now - start, skipped_steps=int(skipped[r]),
                     elapsed=elapsed) for r, (o, result) in enumerate(zip(self.outputs, results))]


def describe_plan(groups: list[list[Member]], shapes: list[tuple[int, int]]) -> str:
  """The plan printed before training: one line per group with its runs, mesh and what varies in it."""
  lines = []
  for k, (members, (r, d)) in enumerate(zip(groups, shapes)):
    varying = hyperparams.varying([m.config for m in members])
    seeds = _seed_streams(members)
    lines.append(f"group {k}: {len(members)} runs, {len(seeds)} input stream(s) (seeds {seeds}), mesh run {r} x "
                 f"data {d}; traced per run: {', '.join(varying) or 'nothing but the seed'}")
    lines += [f"  {m.name}" for m in members]
  return "\n".join(lines)


def group_name(members: list[Member]) -> str:
  """A directory name for a group's stacked checkpoint, stable for the same runs."""
  import hashlib
  digest = hashlib.sha1(json.dumps([[m.workdir, int(m.config.seed)] for m in members]).encode()).hexdigest()
  return f"group_{digest[:10]}"
