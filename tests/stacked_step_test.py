"""The stacked train step (runs trained together) step by step: the convolutions it lowers to, and its equality with
the runs trained alone and with the earlier vmap-of-grad formulation, for every convolution batching and mesh, with
runs that differ in every traced field; a run that diverges is frozen without touching the others.

As in tests/together_test.py the model has no activation kink (`model.leaky_slope = 1`): a stacked program orders
some float operations differently from a run alone (about 1e-7 per step), which a kink can turn into a visibly
different gradient.
"""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from lowered import conv_kinds

from configs import cifar10_lt
from configs import test as test_config
from semi_jax import algorithms, datasets, hyperparams, input_pipeline, sharding, together, train
from semi_jax import program as program_lib
from semi_jax import train_step as steps
from semi_jax.run_axis import RUN_AXIS
from semi_jax.tools import bench

STEPS = 4
SCALARS = {  # run -> {field: value}: every scalar field differs from run 0 in some run
    1: {"optim.lr": 0.02, "optim.momentum": 0.8, "optim.weight_decay": 1e-3, "optim.ema_decay": 0.9,
        "ssl.temperature": 0.9, "ssl.tau1": 1.5, "ssl.tau12": 1.0, "ssl.tau2": 1.5, "ssl.est_epoch": 1,
        "plce.alpha": 0.3, "plce.tau_tar": 0.2, "cons.weight": 0.3, "cons.proto_t": 0.2,
        "cons.center_momentum": 0.8},
    2: {"optim.lr": 0.04, "ssl.est_epoch": 2, "plce.alpha": 0.6, "optim.ema_decay": 0.95},
    3: {"optim.momentum": 0.95, "ssl.temperature": 1.1, "cons.weight": 0.05},
}
CHOICES = {  # every option of every choice field in some run
    "plce.class_weight": algorithms.CLASS_WEIGHTS,
    "bank.decay_clock": ("global", "epoch", "global", "epoch"),
    "plce.class_weight_counts": ("run", "epoch", "epoch", "run"),
}
SCHEDULES = {1: {"bank.beta": {"kind": "linear", "value": 0.9, "end_value": 0.99}},
             2: {"ssl.threshold": {"kind": "step", "value": 0.12, "rate": 0.9, "every": 1}},
             3: {"miner.scale": {"kind": "cosine", "value": 0.2, "end_value": 0.7}}}


def _config(run: int, **fields):
  config = test_config.get_config("steps=8")
  config.model.leaky_slope = 1.0
  config.seed = run % 2
  config.train.steps_per_epoch = 1
  for field, options in CHOICES.items():
    group, name = field.split(".")
    config[group][name] = options[run]
  for field, value in {**SCALARS.get(run, {}), **fields}.items():
    group, name = field.split(".")
    config[group][name] = value
  for field, schedule in SCHEDULES.get(run, {}).items():
    group, name = field.split(".")
    for key, value in schedule.items():
      config[group][name][key] = value
  return config


def _without_pula(config):
  config.ssl.pula = False  # a structure field: the same in every run of a group
  return config


@pytest.fixture(scope="module")
def runs():
  """Four configs of one structure that differ in every traced field, over two seeds (two input streams)."""
  configs = [_without_pula(_config(r)) for r in range(4)]
  assert len(together.plan_groups(configs)) == 1
  varying = set(hyperparams.varying(configs))
  assert set(hyperparams.SCALAR_FIELDS) | set(hyperparams.CHOICE_FIELDS) <= varying, (
      set(hyperparams.SCALAR_FIELDS) | set(hyperparams.CHOICE_FIELDS)) - varying
  return configs


def _streams(configs, blocks: int):
  """Per seed, the first STEPS train batches laid out for `blocks` data-axis devices."""
  dataset = datasets.load(configs[0].data)
  out = {}
  for seed in train.seed_streams(configs):
    data = input_pipeline.make_ssl_data(dataset, configs[0].data, seed)
    ds = input_pipeline.train_dataset(data, configs[0], blocks=blocks)
    out[seed] = [b for _, b in zip(range(STEPS), input_pipeline.as_numpy(ds))]
  return out, dataset


def _alone(config, batches, dataset):
  """`STEPS` steps of the run trained alone on one device: its state."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  data = input_pipeline.make_ssl_data(dataset, config.data, config.seed)
  program = program_lib.build_program(config, mesh, num_classes=dataset.num_classes, class_prior=data.class_prior,
                                      mean=dataset.mean, std=dataset.std)
  rng = jax.random.key(config.seed)
  state, carry = program.init_state(jax.random.fold_in(rng, 0)), program.init_carry()
  for batch in batches:
    state, carry = program.train_step(state, carry, sharding.to_global(batch, mesh), jax.random.fold_in(rng, 1))
  return jax.device_get(state)


def _stacked_program(configs, mesh, dataset, conv="auto"):
  configs = [c.copy_and_resolve_references() for c in configs]
  for c in configs:
    c.together.conv = conv
  data = input_pipeline.make_ssl_data(dataset, configs[0].data, configs[0].seed)
  program = program_lib.build_program(configs[0], mesh, runs=together.padded_runs(len(configs), mesh),
                                      num_classes=dataset.num_classes, class_prior=data.class_prior,
                                      mean=dataset.mean, std=dataset.std)
  inputs, _ = together.stack_inputs(configs, mesh)
  return program, inputs, program.init_state(together.init_keys(configs, mesh))


def _put(streams, seeds, step, mesh):
  spec = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
  batch = {k: np.stack([streams[s][step][k] for s in seeds]) for k in streams[seeds[0]][step]}
  return jax.device_put(batch, spec)


def _stacked(configs, mesh, conv="auto"):
  """`STEPS` steps of the configs stacked on `mesh` with the `conv` batching: (state, the program)."""
  streams, dataset = _streams(configs, mesh.shape[sharding.DATA_AXIS])
  program, inputs, state = _stacked_program(configs, mesh, dataset, conv)
  carry = program.init_carry()
  seeds = train.seed_streams(configs)
  for step in range(STEPS):
    state, carry = program.train_step(state, carry, _put(streams, seeds, step, mesh), inputs)
  return jax.device_get(state), program


def _vmap_of_grad(configs, mesh, dataset):
  """The stacked step as semi_jax built it before the gradient of the summed loss: each run's own step (its
  gradient inside) vmapped over the runs."""
  program, inputs, state = _stacked_program(configs, mesh, dataset, "grouped")
  ctx = program.ctx

  def one(state, rng, hp, stream, batch):
    c = steps.run_context(ctx, hp)
    b = jax.tree.map(lambda x: x[stream], batch)
    return steps.train_step(state, b, rng, c)[0]

  step = jax.jit(lambda state, batch, inputs: jax.vmap(one, in_axes=(0, 0, 0, 0, None), spmd_axis_name=RUN_AXIS)(
      state, inputs["rng"], inputs["hp"], inputs["seed_index"], batch))
  return program, inputs, state, step


def _max_diff(a, b):
  return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def _compare(mine, ref, where):
  for name in ("params", "ema_params", "batch_stats", "opt_state"):
    assert _max_diff(getattr(ref, name), getattr(mine, name)) < 1e-5, f"{where}: {name}"
  for name in ("bank", "class_weight", "qbar", "label_counts", "last_decay_step"):
    assert _max_diff(getattr(ref.semi, name), getattr(mine.semi, name)) < 1e-5, f"{where}: semi.{name}"
  assert int(mine.step) == int(ref.step) == STEPS and int(mine.guard.diverged_step) == -1, where


@pytest.fixture(scope="module")
def alone(runs):
  streams, dataset = _streams(runs, 1)
  return [_alone(c, streams[c.seed], dataset) for c in runs]


@pytest.mark.parametrize("conv, shape", [("grouped", (1, 1)), ("per_run", (1, 1)), ("grouped", (4, 2)),
                                         ("per_run", (4, 2))])
def test_every_formulation_equals_the_runs_trained_alone(runs, alone, conv, shape):
  """Runs that differ in every scalar, choice and in schedules: each stacked run equals the same run trained
  alone, on one device and on a 4 x 2 mesh, with grouped and with per-run convolutions."""
  mesh = together.make_mesh(*shape, jax.devices()[:shape[0] * shape[1]])
  state, program = _stacked(runs, mesh, conv)
  assert program.conv == conv
  for r, ref in enumerate(alone):
    _compare(jax.tree.map(lambda x: x[r], state), ref, f"{conv} {shape} run {r}")


def test_the_summed_loss_gradient_equals_vmap_of_grad(runs, alone):
  """The earlier formulation (each run's gradient inside the vmap) gives the same runs, and so do both new ones."""
  mesh = together.make_mesh(1, 1, jax.devices()[:1])
  streams, dataset = _streams(runs, 1)
  _, inputs, state, step = _vmap_of_grad(runs, mesh, dataset)
  seeds = train.seed_streams(runs)
  for i in range(STEPS):
    state = step(state, _put(streams, seeds, i, mesh), inputs)
  state = jax.device_get(state)
  for r, ref in enumerate(alone):
    _compare(jax.tree.map(lambda x: x[r], state), ref, f"vmap of grad run {r}")


def test_auto_picks_the_measured_formulation_per_platform():
  assert program_lib.conv_formulation("auto", {"cpu"}) == program_lib.AUTO_CONV["cpu"]
  assert program_lib.conv_formulation("auto", {"tpu"}) == "grouped"  # not measured: the batch-grouped program
  assert program_lib.conv_formulation("per_run", {"tpu"}) == "per_run"
  assert program_lib.overlap_options("on", {"cpu"}) == {}  # a GPU option only
  assert program_lib.overlap_options("on", {"cuda"}) == program_lib.GPU_OVERLAP_OPTIONS
  with pytest.raises(ValueError, match="together.conv"):
    program_lib.conv_formulation("loop", {"cpu"})


# --- the convolutions of the lowered program (WRN-28-2, 32x32, 3 runs, flax layers) ------------------------------

@pytest.fixture(scope="module")
def wrn_programs():
  """The lowered train steps of 3 stacked WRN-28-2 runs (32x32, flax's layers) in each formulation, and of the
  earlier vmap of grad."""
  config = cifar10_lt.get_config()
  config.cpu_fast_paths = "off"
  mesh = together.make_mesh(1, 1, jax.devices()[:1])
  prior, mean, std = bench.long_tail_prior(10), np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  batch = bench.synthetic_batch(np.random.default_rng(0), config, 10)
  batch = {k: jax.ShapeDtypeStruct((1,) + v.shape, v.dtype) for k, v in batch.items()}
  texts = {}
  for conv in ("grouped", "per_run", "vmap of grad"):
    config.together.conv = "grouped" if conv == "vmap of grad" else conv
    program = program_lib.build_program(config, mesh, runs=3, num_classes=10, class_prior=prior, mean=mean,
                                        std=std)
    inputs, _ = together.stack_inputs([config] * 3, mesh)
    state = jax.eval_shape(program.init_state, together.init_keys([config] * 3, mesh))
    if conv == "vmap of grad":
      ctx = program.ctx
      one = lambda s, rng, i, b: steps.train_step(s, jax.tree.map(lambda x: x[i], b), rng, ctx)[0]
      fn = jax.jit(lambda s, b, inputs: jax.vmap(one, in_axes=(0, 0, 0, None))(s, inputs["rng"],
                                                                                 inputs["seed_index"], b))
      texts[conv] = fn.lower(state, batch, inputs).as_text()
    else:
      texts[conv] = program.train_step.lower(state, jax.eval_shape(program.init_carry), batch, inputs).as_text()
  return texts


def test_no_kernel_gradient_is_a_feature_grouped_convolution(wrn_programs):
  """vmap of grad turned each of WRN-28-2's 28 kernel gradients into a feature-grouped convolution whose window is
  the whole output gradient; the gradient of the summed loss makes them batch-grouped, and the per-run batching
  makes every convolution an ordinary one, as a run alone has."""
  before = conv_kinds(wrn_programs["vmap of grad"])
  assert before[("feature-grouped", "whole input")] == 28, before  # what the check finds in the earlier program
  grouped, per_run = conv_kinds(wrn_programs["grouped"]), conv_kinds(wrn_programs["per_run"])
  for kinds in (grouped, per_run):
    assert kinds[("feature-grouped", "whole input")] == 0, kinds
  # Forward and data gradients (55) grouped, kernel gradients (28) batch-grouped; and one run's own 83 in the branch
  # that recomputes the runs one by one if a NaN could have crossed between them (train_step.stacked_step).
  assert grouped == {("feature-grouped", "small window"): 55, ("batch-grouped", "whole input"): 28,
                     ("ordinary", "small window"): 55, ("ordinary", "whole input"): 28}, grouped
  # Each run's own convolutions, as a run alone has them: forward and data gradients, and the 28 kernel gradients.
  assert per_run == {("ordinary", "small window"): 3 * 55, ("ordinary", "whole input"): 3 * 28}, per_run


# --- a run that diverges ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", ["grouped", "per_run"])
def test_a_diverging_run_is_frozen_and_the_others_train_as_without_it(conv):
  """Three runs, the middle one with a learning rate that makes it diverge: it stops at its first non-finite step
  and its state never changes again, while the other two equal the same two runs stacked without it. With grouped
  convolutions this needs the per-run recompute of the step in which the NaN appears (XLA:CPU spreads a NaN of one
  group of a batch-grouped convolution into every group)."""
  configs = [_without_pula(_config(0)), _without_pula(_config(0, **{"optim.lr": 1e6})), _without_pula(_config(2))]
  configs[1].seed = 0
  mesh = together.make_mesh(1, 1, jax.devices()[:1])
  streams, dataset = _streams(configs, 1)
  seeds = train.seed_streams(configs)
  program, inputs, state = _stacked_program(configs, mesh, dataset, conv)
  carry, history = program.init_carry(), []
  for step in range(STEPS):
    state, carry = program.train_step(state, carry, _put(streams, seeds, step, mesh), inputs)
    history.append(jax.device_get(jax.tree.map(lambda x: x[1], state)))
  diverged = int(history[-1].guard.diverged_step)
  assert 1 <= diverged < STEPS, diverged
  for later in history[diverged - 1:]:
    assert _max_diff(later.replace(guard=None), history[diverged - 1].replace(guard=None)) == 0.0
    assert np.isfinite(np.asarray(jax.tree.leaves(later.params)[0])).all()
  state = jax.device_get(state)
  without, _ = _stacked([configs[0], configs[2]], mesh, conv)
  for r, w in ((0, 0), (2, 1)):
    _compare(jax.tree.map(lambda x: x[r], state), jax.tree.map(lambda x: x[w], without), f"{conv} run {r}")
