"""Runs trained together: several runs of one program structure as ONE jitted program with a leading run axis.

One SeMi run of the papers' size uses a few per cent of a modern accelerator, and spreading it over many chips
leaves each a handful of images. An ablation sweep instead stacks its runs:

- the train state (parameters, optimiser state, EMA, BatchNorm statistics, memory bank, monitor, consistency
  centre, divergence guard, step) gets a leading run axis, and one program trains every run
  (`train_step.stacked_step`: the gradient of the summed loss, the update vmapped per run);
- the fields in which the runs differ (every schedule, kinds included, the scalars of `hyperparams.SCALAR_FIELDS`
  and the choices of `hyperparams.CHOICE_FIELDS`) are per-run array inputs of the step, traced, not baked in; runs
  that differ in anything else (shapes, component switches, the algorithm, the data) are different programs:
  `plan_groups` splits them into as few groups as possible;
- runs with the same seed share one input stream (the same batches: common random numbers), so the host's input
  cost grows with the number of seeds, not of variants;
- the mesh has a `run` axis beside the `data` axis: runs are sharded over `run`, each run's batch over `data`
  (`choose_axes`), from one device (all runs vmapped on it) to a multi-host slice;
- a run that diverges is frozen and reported as failed; the others train on.

Every run still gets its own workdir with config.json, eval.jsonl, summary.json and TensorBoard events
(`outputs.RunOutputs`); the stacked state is checkpointed in the group's own directory, with the real run count,
so that it resumes on another device count or run axis. `GroupTrainer` is the training loop of `semi_jax.train`
set up for a group.
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semi_jax import config_validation, datasets, distributed, files, hyperparams, sharding, train
from semi_jax.run_axis import RUN_AXIS

# The smallest labeled batch per device the automatic split gives a run (unless the whole batch is smaller):
# below it a device's share of the step is too small to keep it busy, and BatchNorm still sees the global batch
# but each device's work is dominated by fixed costs.
MIN_DEVICE_BATCH = 16
GROUP_FILE = "group.json"
Member = train.Member


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
                devices_per_process: int | None = None, platform: str = "cpu", run_bytes: float | None = None,
                device_bytes: float | None = None, batches: dict[str, int] | None = None) -> tuple[int, int]:
  """(run axis size, data axis size) of a mesh over all `num_devices` for `num_runs` stacked runs.

  A given `run_axis_size` (> 0) must divide the devices. Automatic (-1): among the splits that fit in the
  devices' memory (`run_bytes` per run, replicated over the data axis, against `device_bytes`, where both are
  known), the one with the least work per device and step (ceil(runs / run axis) runs of batch_size / data axis
  images each), keeping the per-device labeled batch >= MIN_DEVICE_BATCH where the batch allows; ties go to the
  smaller data axis (fewer collectives). On GPUs, where stacked WRN-28-2 runs measured slower per run than runs
  alone (docs/performance.md), the fewest runs per device come first. With several processes a data axis must
  divide a process's devices or be a multiple of them, so that every process feeds whole, equal slices of the
  batch. `batches` (`config_validation.global_batches`; default: `batch_size` alone) must all split over the data
  axis, the evaluation's included, so that an automatic choice is never refused later.
  """
  per_process = devices_per_process or num_devices
  batches = batches or {"train.batch_size": batch_size}

  def valid(d):
    return (num_devices % d == 0 and all(b % d == 0 for b in batches.values())
            and (per_process % d == 0 or d % per_process == 0))

  def runs_per_device(d):
    return _runs_per_slot(num_runs, num_devices // d)

  if run_axis_size != -1:
    if run_axis_size < 1 or num_devices % run_axis_size:
      raise config_validation.ConfigError(
          f"run axis size {run_axis_size} does not divide the {num_devices} devices; choose one of "
          f"{_divisors(num_devices)} or -1 (automatic).")
    d = num_devices // run_axis_size
    if not valid(d):
      raise config_validation.ConfigError(
          f"run axis size {run_axis_size} leaves a data axis of {d} devices, which "
          f"{', '.join(f'{k}={v}' for k, v in batches.items())} (or the processes' {per_process} devices each) "
          "cannot all be split over; valid run axis sizes: "
          f"{[num_devices // k for k in _divisors(num_devices) if valid(k)]}.")
    return run_axis_size, d
  candidates = [d for d in _divisors(num_devices) if valid(d) and (d == 1 or batch_size // d >= MIN_DEVICE_BATCH)]
  if run_bytes and device_bytes:
    fits = [d for d in candidates if runs_per_device(d) * run_bytes <= device_bytes]
    if not fits:
      raise config_validation.ConfigError(
          f"{num_runs} stacked runs of about {run_bytes / 2**20:.0f} MB each do not fit in the devices' "
          f"{device_bytes / 2**30:.1f} GB at any split of the {num_devices} devices (at best "
          f"{runs_per_device(min(candidates)) if candidates else num_runs} runs per device); train fewer runs "
          "together (--only or --seeds) or use more devices.")
    candidates = fits
  if platform == "gpu":
    key = lambda d: (runs_per_device(d), runs_per_device(d) * batch_size / d, d)
  else:
    key = lambda d: (runs_per_device(d) * batch_size / d, d)
  d = min(candidates, key=key)
  return num_devices // d, d


def axes_for(config, num_devices: int, num_runs: int, **kwargs) -> tuple[int, int]:
  """`choose_axes` for `num_runs` runs of `config`: its labeled batch sets the work per device, and every global
  batch of it (`config_validation.global_batches`) must split over the data axis."""
  return choose_axes(num_devices, num_runs, config.train.batch_size,
                     batches=config_validation.global_batches(config), **kwargs)


def make_mesh(run_axis_size: int, data_axis_size: int, devices=None) -> Mesh:
  """A (run, data) mesh over `devices` (default: all), laid out by the interconnect (`sharding.device_grid`: a
  data row gets neighbouring chips, the run axis spans slices first); on CPUs, rows of `data_axis_size`
  consecutive devices (a process's devices are consecutive, so a row never straddles processes when the data axis
  fits in one)."""
  devices = list(jax.devices() if devices is None else devices)
  if run_axis_size * data_axis_size != len(devices):
    raise ValueError(f"a {run_axis_size} x {data_axis_size} mesh needs {run_axis_size * data_axis_size} devices, "
                     f"got {len(devices)}.")
  grid = sharding.device_grid(devices, (run_axis_size, data_axis_size))
  return Mesh(grid, (RUN_AXIS, sharding.DATA_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def data_slice(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process feeds the index-th of `count` equal slices of every batch along the data axis
  (the positions of its devices on that axis; processes on the same positions feed the same slice)."""
  grid = np.moveaxis(mesh.devices, mesh.axis_names.index(sharding.DATA_AXIS), -1)
  mine = sharding.data_positions(grid).get(jax.process_index(), [])
  size = grid.shape[-1]
  if not sharding.aligned(mine, size):
    raise ValueError(f"process {jax.process_index()} holds data-axis positions {mine} of {size}: every process "
                     "must hold an aligned, equal range of them (see choose_axes).")
  return mine[0] // len(mine), size // len(mine)


def _runs_per_slot(num_runs: int, slots: int) -> int:
  """The runs each of `slots` positions of the run axis holds when `num_runs` runs are spread over them."""
  return -(-num_runs // slots)


def padded_runs(num_runs: int, mesh: Mesh) -> int:
  """The run count padded to a multiple of the mesh's run axis (copies of the last run fill the rest)."""
  axis = mesh.shape[RUN_AXIS]
  return _runs_per_slot(num_runs, axis) * axis


def padded_configs(configs, runs: int) -> list:
  """`configs` padded to `runs` runs with copies of the last (`padded_runs`)."""
  return [configs[min(i, len(configs) - 1)] for i in range(runs)]


def stream_indices(configs, runs: int) -> list[int]:
  """The input stream (`train.seed_streams`) of each of the `runs` padded runs."""
  seeds = train.seed_streams(configs)
  return [seeds.index(int(c.seed)) for c in padded_configs(configs, runs)]


def stack_inputs(configs, mesh: Mesh) -> tuple[dict, tuple[str, ...]]:
  """(the stacked step's per-run inputs, the traced fields) for `configs` padded to the mesh's run axis with
  copies of the last: each run's step key as a run alone makes it (fold_in(key(seed), 1)), its stream, the
  fields in which the runs differ (`hyperparams.of_config`) and, per stream, the step key of its seed."""
  runs = padded_runs(len(configs), mesh)
  padded = padded_configs(configs, runs)
  varying = hyperparams.varying(list(configs))
  by_run = NamedSharding(mesh, P(RUN_AXIS))
  seeds = train.seed_streams(configs)
  step_key = lambda seeds: jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(np.asarray(seeds, np.int32))
  inputs = {"rng": jax.jit(lambda: step_key([c.seed for c in padded]), out_shardings=by_run)(),
            "hp": sharding.from_host_values(hyperparams.stack([hyperparams.of_config(c, varying) for c in padded]),
                                            by_run),
            "seed_index": sharding.from_host_values(np.asarray(stream_indices(configs, runs), np.int32), by_run),
            "stream_rng": jax.jit(lambda: step_key(seeds), out_shardings=sharding.replicated(mesh))()}
  return inputs, varying


def init_keys(configs, mesh: Mesh):
  """Each padded run's init key as a run alone makes it: fold_in(key(seed), 0)."""
  seeds = np.asarray([c.seed for c in padded_configs(configs, padded_runs(len(configs), mesh))], np.int32)
  return jax.jit(lambda: jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seeds),
                 out_shardings=NamedSharding(mesh, P(RUN_AXIS)))()


class GroupTrainer(train.Trainer):
  """Trains the members of one group (equal `hyperparams.structure`) together: `semi_jax.train`'s loop over a
  stacked state; `run()` trains every member to the end and returns their summaries."""

  def __init__(self, members: list[Member], group_dir: str, mesh: Mesh):
    if not members:
      raise ValueError("a group needs at least one run.")
    if len({hyperparams.structure(m.config) for m in members}) > 1:
      raise ValueError("the runs of a group must share their structure (hyperparams.structure); plan_groups "
                       "splits a sweep into such groups.")
    self.group_dir = group_dir
    data_axis = mesh.shape[sharding.DATA_AXIS]
    slice_index, slice_count = data_slice(mesh)
    for m in members:
      try:
        config_validation.validate(m.config, num_devices=data_axis, num_processes=slice_count)
      except ValueError as e:
        raise config_validation.ConfigError(f"{m.label}: {e}") from None
    self.members = list(members)
    self._check_group_dir()
    self._start(self.members, mesh, files.join(group_dir, "checkpoints"), runs=padded_runs(len(members), mesh),
                slice_index=slice_index, slice_count=slice_count, lease_dirs=(group_dir,))
    if self.is_lead:
      files.write_json_atomic(files.join(self.group_dir, GROUP_FILE), self._manifest())

  def _init_state(self):
    configs = [m.config for m in self.members]
    self.state = self.program.init_state(init_keys(configs, self.mesh))
    self.step_inputs, self.varying = stack_inputs(configs, self.mesh)
    self.seed_index_host = stream_indices(configs, self.runs)

  def _manifest(self) -> dict:
    return {"runs": [{"name": m.name, "workdir": m.workdir, "seed": int(m.config.seed)} for m in self.members]}

  def _check_group_dir(self) -> None:
    """A group directory belongs to one list of runs: its checkpoint is never restored into other runs."""
    path = files.join(self.group_dir, GROUP_FILE)
    saved = distributed.agreed("group-manifest", files.read_json(path, strict=False))
    if saved is not None and saved != self._manifest():
      raise config_validation.ConfigError(
          f"{self.group_dir} holds the checkpoint of another group of runs ({path}); use another --workdir or "
          "delete that directory.")

  # --- what differs from a run alone ----------------------------------------------------------------------------

  def fetch(self, tree):
    """Run-sharded arrays on the host, whole (the run axis may span processes: then gathered from all of them, a
    collective every process makes at the same point)."""
    if jax.process_count() == 1:
      return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)

  def take(self, tree, r: int):
    return jax.tree.map(lambda x: x[r], tree)

  def put(self, batches: list[dict]):
    """Per-stream local batches (numpy) -> one global array per key with a leading stream axis."""
    spec = NamedSharding(self.mesh, P(None, sharding.DATA_AXIS))
    out = {}
    for k in batches[0]:
      local = np.stack([b[k] for b in batches])
      shape = (local.shape[0], local.shape[1] * self.slice_count) + local.shape[2:]
      out[k] = jax.make_array_from_process_local_data(spec, local, shape)
    return out

  def eval_index(self, index):
    return sharding.from_host_values(np.asarray(index, np.int32), NamedSharding(self.mesh, P(RUN_AXIS)))

  def stream_index(self) -> list[int]:
    return self.seed_index_host


def state_bytes(config, num_classes: int) -> int:
  """Bytes of one run's train state (parameters, EMA, optimiser state, BatchNorm statistics, memory bank, ...)."""
  from semi_jax.models import create_model
  from semi_jax.state import create_train_state, make_optimizer
  model = create_model(config.model, num_classes)
  tx = make_optimizer(config, hyperparams.of_config(config))
  shapes = jax.eval_shape(lambda key: create_train_state(
      model, tx, key, config.data.image_size, num_classes, config.bank.size, config.bank.dtype,
      guard_window=config.train.nonfinite_window), jax.random.key(0))
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def activation_bytes(config, num_classes: int) -> int:
  """An estimate of one run's activations in a train step: the outputs of every layer of the forward pass over
  the step's images (what the backward pass keeps), from the shapes alone."""
  from semi_jax.models import create_model
  model = create_model(config.model, num_classes)
  t, s = config.train, config.data.image_size
  images = jax.ShapeDtypeStruct((t.batch_size * (1 + 3 * t.mu), s, s, 3), np.float32)

  def forward(x):
    variables = model.init(jax.random.key(0), x[:1], train=False)
    return model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                       capture_intermediates=True)[1]["intermediates"]

  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(forward, images))))


def device_memory_bytes() -> int | None:
  """The memory of one of this process's devices where the backend reports it (GPUs, TPUs), else None (CPUs)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - a backend without memory statistics
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def run_memory(config) -> dict:
  """Memory of one run of `config` in bytes: its state (exact) and an estimate of its step's activations."""
  num_classes = datasets.num_classes(config.data.name)
  return {"state": state_bytes(config, num_classes), "activations": activation_bytes(config, num_classes)}


def per_device_bytes(memory: dict, runs: int, mesh_shape: tuple[int, int]) -> float:
  """Estimated bytes per device of `runs` runs on a (run, data) mesh: each device holds the state of its runs,
  replicated over the data axis, and its share of their activations."""
  r, d = mesh_shape
  per_device = _runs_per_slot(runs, r)
  return per_device * (memory["state"] + memory["activations"] / d)


def describe_plan(groups: list[list[Member]], shapes: list[tuple[int, int]], memory: list[dict] | None = None) -> str:
  """The plan printed before training: one line per group with its runs, mesh, what varies in it and, with
  `memory` (`run_memory` per group), the estimated memory per run and per device."""
  lines = []
  for k, (members, (r, d)) in enumerate(zip(groups, shapes)):
    varying = hyperparams.varying([m.config for m in members])
    seeds = train.seed_streams([m.config for m in members])
    lines.append(f"group {k}: {len(members)} runs, {len(seeds)} input stream(s) (seeds {seeds}), mesh run {r} x "
                 f"data {d} ({_runs_per_slot(len(members), r)} runs per device); traced per run: "
                 f"{', '.join(varying) or 'nothing but the seed'}")
    if memory:
      m = memory[k]
      lines.append(f"  memory: {m['state'] / 2**20:.1f} MB state + ~{m['activations'] / 2**20:.0f} MB activations "
                   f"per run, ~{per_device_bytes(m, len(members), (r, d)) / 2**20:.0f} MB per device (estimate; "
                   "XLA's figure for the compiled step is logged when it compiles)")
    lines += [f"  {m.name}" for m in members]
  return "\n".join(lines)


def group_name(members: list[Member]) -> str:
  """A directory name for a group's stacked checkpoint, stable for the same runs."""
  digest = hashlib.sha1(json.dumps([[m.workdir, int(m.config.seed)] for m in members]).encode()).hexdigest()
  return f"group_{digest[:10]}"
