"""Runs trained together (semi_jax.together): grouping, the mesh split, and equality with runs trained alone.

The stacked (vmapped) step is not bitwise equal to the step of a run alone: XLA:CPU orders some float operations
of the batched program differently (about 1e-7 per step on the test config). Where such a difference moves an
activation across the kink of the (leaky) ReLU, that element's gradient changes by 90 % of its upstream gradient:
on the test config one run in four jumps to 1e-4..1e-3 within 20 steps (the same happens between meshes). The
equivalence test therefore trains with model.leaky_slope = 1 (no kink; BatchNorm, the heads, the bank and every
SeMi part unchanged): then 6 runs agree within 1e-5 over 20 steps. Resumption is compared bitwise (the stacked
program with itself).
"""
import glob
import json
import os
import signal
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from semi_jax import config_validation, files, hyperparams, outputs, schedules, sharding, sweep, together, train

SPEC = "tests/data/together_sweep.py"  # 3 decay variants on the test config, 20 steps, no activation kink
SEEDS = [0, 1]


def _runs(workdir, spec=SPEC, only=None, seeds=SEEDS):
  return sweep.plan(spec, workdir, seeds=seeds, only=only)


def _max_diff(a, b):
  return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def _evals(workdir):
  return [json.loads(line) for line in files.read_text(files.join(workdir, outputs.EVAL_LOG)).splitlines()]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
  """Six runs (3 variants x 2 seeds) trained together on 8 devices as run 4 x data 2 (padded to 8 runs)."""
  workdir = str(tmp_path_factory.mktemp("together"))
  runs = _runs(workdir)
  members = [together.Member(r.config, r.workdir, f"{r.variant} seed {r.seed}") for r in runs]
  trainer = together.GroupTrainer(members, os.path.join(workdir, "group"), together.make_mesh(4, 2))
  summaries = trainer.run()
  return runs, trainer, summaries


def test_stacked_runs_equal_the_same_runs_trained_alone(stacked, tmp_path):
  runs, trainer, summaries = stacked
  assert trainer.varying == ("bank.beta", "plce.ramp")
  assert trainer.runs == 8 and len(trainer.seeds) == 2
  state = jax.device_get(trainer.state)
  assert (np.asarray(state.step) == 20).all()
  for r, run in enumerate(runs):
    alone = train.Trainer(run.config, str(tmp_path / f"alone{r}"), mesh=sharding.make_mesh(None, jax.devices()[:2]))
    summary = alone.run()
    ref = jax.device_get(alone.state)
    mine = jax.tree.map(lambda x: x[r], state)
    where = f"{run.variant} seed {run.seed}"
    assert _max_diff(ref.params, mine.params) < 1e-5, where
    assert _max_diff(ref.ema_params, mine.ema_params) < 1e-5, where
    assert _max_diff(ref.semi.bank, mine.semi.bank) < 1e-5, where
    assert _max_diff(ref.semi.class_weight, mine.semi.class_weight) < 1e-5, where
    assert _max_diff(ref.semi.qbar, mine.semi.qbar) < 1e-5, where
    for a, b in zip(_evals(alone.workdir), _evals(run.workdir), strict=True):
      assert a["step"] == b["step"]
      for head in ("standard", "balanced"):
        np.testing.assert_allclose(a[head]["per_class"], b[head]["per_class"], atol=1e-5, err_msg=where)
      np.testing.assert_allclose(a["bank_fill"], b["bank_fill"], atol=1e-5, err_msg=where)
    assert summaries[r]["balanced_acc"] == pytest.approx(summary["balanced_acc"], abs=1e-5)
    assert summaries[r]["step"] == 20


def test_no_host_transfer_inside_the_stacked_step(stacked):
  """The stacked step (guard, per-run inputs and metrics included) runs under transfer_guard('disallow') on the
  4 x 2 mesh: the per-run inputs stay on the devices between steps."""
  _, trainer, _ = stacked
  program = trainer.program
  batches = [trainer.put(b) for _, b in zip(range(2), trainer.train_batches(0))]
  state = jax.tree.map(lambda x: x.copy(), trainer.state)  # the step donates its state; the fixture keeps its own
  carry = program.init_carry()
  state, carry = program.train_step(state, carry, batches[0], trainer.step_inputs)  # compile outside the guard
  with jax.transfer_guard("disallow"):
    for b in batches:
      state, carry = program.train_step(state, carry, b, trainer.step_inputs)
  counts = jax.device_get(carry["metrics"]).loss.count
  assert counts.shape == (8,) and np.all(counts == 3), counts


def test_each_run_writes_its_own_outputs(stacked):
  runs, _, summaries = stacked
  for run, summary in zip(runs, summaries):
    assert files.read_json(files.join(run.workdir, outputs.SUMMARY))["step"] == 20
    assert files.read_json(files.join(run.workdir, train.CONFIG_FILE))["seed"] == run.seed
    assert [e["step"] for e in _evals(run.workdir)] == list(range(2, 21, 2))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run.workdir))
  # The variants differ, and runs of one seed share the stream but not the result.
  accs = {(r.variant, r.seed): s["balanced_acc"] for r, s in zip(runs, summaries)}
  assert len(set(accs.values())) > 1


def test_groups_split_on_structure_only(tmp_path):
  runs = sweep.plan("configs/ablations/components.py:base=test", str(tmp_path), seeds=[0, 1])
  groups = [[f"{runs[i].variant}/{runs[i].seed}" for i in g] for g in together.plan_groups([r.config for r in runs])]
  # Every component variant switches parts on or off (the program's structure); seeds never split a group.
  assert groups == [[f"{v}/0", f"{v}/1"] for v in
                    ["fixmatch", "acr", "acr_miner", "acr_miner_plce", "semi", "semi_no_miner", "semi_no_bank"]]
  runs = sweep.plan("configs/ablations/decay.py", str(tmp_path), seeds=[0])  # digits base, every decay variant
  assert together.plan_groups([r.config for r in runs]) == [list(range(len(runs)))]
  varying = hyperparams.varying([r.config for r in runs])
  assert set(varying) == {"bank.beta", "bank.decay_every", "bank.decay_clock", "plce.ramp", "ssl.threshold",
                          "miner.scale", "plce.class_weight", "plce.class_weight_counts"}
  shaped = [r.config for r in runs[:2]]
  with shaped[1].unlocked():
    shaped[1].bank.size = 8
  assert together.plan_groups(shaped) == [[0], [1]]


@pytest.mark.parametrize("devices, runs, batch, run_axis, per_process, expected", [
    (8, 9, 32, -1, None, (4, 2)),  # 3 runs of 16 images per device beat 2 runs of 32
    (8, 27, 64, -1, None, (4, 2)),  # 7 runs x 32 images = 14 x 16: the tie goes to the smaller data axis
    (8, 2, 64, -1, None, (2, 4)),
    (1, 9, 32, -1, None, (1, 1)),  # one device: every run vmapped on it
    (8, 6, 8, -1, None, (8, 1)),  # a batch of 8 is not split
    (8, 6, 8, 4, None, (4, 2)),  # the user's choice, below the minimum per-device batch
    (8, 3, 64, -1, 4, (4, 2)),  # 1 run x 32 images = 2 x 16: the smaller data axis
    (6, 4, 48, -1, 3, (2, 3)),  # two processes of 3 devices
])
def test_choose_axes(devices, runs, batch, run_axis, per_process, expected):
  assert together.choose_axes(devices, runs, batch, run_axis, per_process) == expected


def test_choose_axes_weighs_memory_and_the_platform():
  # 27 runs on 8 devices: 7 runs x 32 images per device tie with 14 x 16; the smaller data axis wins.
  assert together.choose_axes(8, 27, 64) == (4, 2)
  # With 1 GB per run and 5 GB devices only 4 runs per device fit: every device takes its own runs.
  assert together.choose_axes(8, 27, 64, run_bytes=1e9, device_bytes=5e9) == (8, 1)
  with pytest.raises(config_validation.ConfigError, match="do not fit in the devices' 0.9 GB"):
    together.choose_axes(8, 27, 64, run_bytes=1e9, device_bytes=1e9)
  # GPUs: the fewest runs per device first (stacked WRN-28-2 runs measured slower per run than runs alone).
  assert together.choose_axes(8, 27, 64, platform="gpu") == (8, 1)


def test_choose_axes_refuses_a_split_that_does_not_fit():
  with pytest.raises(config_validation.ConfigError, match="does not divide the 8 devices"):
    together.choose_axes(8, 4, 32, run_axis_size=3)
  with pytest.raises(config_validation.ConfigError, match="valid run axis sizes"):
    together.choose_axes(8, 4, 12, run_axis_size=1)  # a data axis of 8 cannot split a batch of 12
  with pytest.raises(config_validation.ConfigError, match="valid run axis sizes: \\[6, 2, 1\\]"):
    together.choose_axes(6, 4, 48, run_axis_size=3, devices_per_process=3)  # 2 devices would straddle processes


def test_choose_axes_splits_every_global_batch_over_the_data_axis():
  config = test_config.get_config()
  config.train.batch_size, config.train.mu, config.train.eval_batch_size = 64, 7, 34
  batches = config_validation.global_batches(config)
  assert batches == {"train.batch_size": 64, "train.batch_size * train.mu": 448, "train.eval_batch_size": 34}
  # 2 runs of 64 images take a data axis of 4 (test_choose_axes); an evaluation batch of 34 splits over 2 at most.
  assert together.choose_axes(8, 2, 64, batches=batches) == (4, 2)
  config_validation.validate(config, num_devices=2)  # what the group checks later passes
  with pytest.raises(config_validation.ConfigError, match="train.eval_batch_size"):
    config_validation.validate(config, num_devices=4)
  with pytest.raises(config_validation.ConfigError, match=r"train.eval_batch_size=34 .*valid run axis sizes: \[8, 4\]"):
    together.choose_axes(8, 2, 64, run_axis_size=2, batches=batches)


def test_mesh_rows_and_data_slices():
  mesh = together.make_mesh(4, 2)
  assert dict(mesh.shape) == {"run": 4, "data": 2}
  assert [d.id for d in mesh.devices[1]] == [jax.devices()[2].id, jax.devices()[3].id]
  assert together.data_slice(mesh) == (0, 1)  # one process holds every data position
  with pytest.raises(ValueError, match="needs 8 devices"):
    together.make_mesh(4, 2, jax.devices()[:4])


@pytest.mark.parametrize("cfg", [
    schedules.schedule_config("constant", value=0.95),
    schedules.schedule_config("linear", value=0.95, end_value=0.999, start_step=3),
    schedules.schedule_config("cosine", value=0.3, end_value=0.0177, warmup_steps=7, warmup_value=0.1),
    schedules.schedule_config("exponential", value=0.9, rate=0.97, every=3, start_step=5),
    schedules.schedule_config("step", value=0.95, rate=0.95, every=25),
    schedules.schedule_config("reference_cosine", value=1.0, cycles=7 / 16, warmup_steps=11),
    schedules.schedule_config("reference_ramp", value=0.7),
])
def test_schedule_as_arrays_is_the_same_function(cfg):
  steps = np.arange(0, 130, dtype=np.int32)
  static = np.asarray(schedules.make_schedule(cfg, 100, 7)(steps))
  arrays = schedules.as_arrays(cfg, 100, 7)
  traced = np.asarray(jax.jit(lambda a, s: a(s))(arrays, steps))
  # Up to XLA's rounding of the static program's constant expressions.
  np.testing.assert_allclose(traced, static, rtol=2e-7, atol=1e-7)
  # Stacked with a schedule of another kind, each run still gets its own function.
  other = schedules.as_arrays(schedules.schedule_config("step", value=2.0, rate=0.5, every=10), 100, 7)
  both = jax.tree.map(lambda a, b: np.stack([a, b]), arrays, other)
  stacked = np.asarray(jax.jit(jax.vmap(lambda a, s: a(s), in_axes=(0, None)))(both, steps))
  np.testing.assert_allclose(stacked[0], static, rtol=2e-7, atol=1e-7)
  np.testing.assert_allclose(stacked[1], 2.0 * 0.5 ** (steps // 10), rtol=1e-7)


def test_hyperparameters_as_the_step_reads_them():
  """Every traced field of a run as its step reads it (`hyperparams.of_config`): constants of a run alone, which
  compute one option of a choice or one formula of a schedule; traced, they compute all and select."""
  from configs import test as test_config
  config = test_config.get_config()
  config.lock()
  hp = hyperparams.of_config(config)
  assert set(hp) == set(hyperparams.traceable_fields(config))
  assert hp["ssl.est_epoch"].dtype == np.int32 and hp["bank.decay_clock"] == 1  # "global"
  assert hp["plce.alpha"] == np.float32(0.4) and hp["ssl.threshold"](3) == np.float32(0.12)
  calls = []
  branches = {"a": lambda: calls.append("a") or jnp.float32(1.0), "bb": lambda: calls.append("bb") or jnp.float32(2.0)}
  assert float(hyperparams.choose(np.int32(1), ("a", "bb"), branches)) == 2.0 and calls == ["bb"]
  calls.clear()
  assert float(jax.jit(lambda i: hyperparams.choose(i, ("a", "bb"), branches))(np.int32(0))) == 1.0
  assert calls == ["a", "bb"]
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.plce.alpha, other.seed, other.ssl.threshold.kind = 0.3, 5, "linear"
  assert hyperparams.structure(other) == hyperparams.structure(config)
  with other.unlocked():
    other.plce.renormalize = False
  assert hyperparams.structure(other) != hyperparams.structure(config)


def test_resume_after_kill_is_bitwise_equal(tmp_path):
  import processes
  spec = "configs/ablations/decay.py:base=test,steps=8"
  flags = ["--seeds=0", "--only=reference,beta_anneal,weight_decayed_inverse", "--together"]
  # Uninterrupted, in this process.
  done = str(tmp_path / "uninterrupted")
  together_main(spec, done, flags)
  # Killed (SIGKILL) right after its checkpoint at step 4, then resumed.
  killed = str(tmp_path / "killed")
  job = processes.Job(killed, tmp_path, flags, processes=1, local_devices=8, module="semi_jax.sweep", config=spec,
                      name="killed")
  deadline = time.monotonic() + 300
  while not glob.glob(os.path.join(killed, "together", "group_*", "checkpoints", "4")):
    assert job.procs[0].poll() is None and time.monotonic() < deadline, job.describe()
    time.sleep(0.2)
  job.signal(0, signal.SIGKILL)
  job.wait(60)
  assert not os.path.exists(os.path.join(killed, "reference", "seed_0", outputs.SUMMARY))
  together_main(spec, killed, flags)
  for variant in ("reference", "beta_anneal", "weight_decayed_inverse"):
    a, b = (os.path.join(d, variant, "seed_0") for d in (done, killed))
    assert _evals(a) == _evals(b), variant
    sa, sb = files.read_json(os.path.join(a, outputs.SUMMARY)), files.read_json(os.path.join(b, outputs.SUMMARY))
    assert {k: v for k, v in sa.items() if k not in ("train_seconds", "trained_steps")} == {
        k: v for k, v in sb.items() if k not in ("train_seconds", "trained_steps")}
  # A finished group is skipped.
  lines = together_main(spec, killed, flags)
  assert sum("finished, skipped" in line for line in lines) == 3
  # The plan names each group's memory per run and per device.
  plan = "\n".join(together_main(spec, str(tmp_path / "planned"), ["--seeds=0", "--only=reference"], dry=True))
  assert "MB state +" in plan and "MB per device" in plan, plan


def together_main(spec, workdir, flags, dry=False):
  """`python -m semi_jax.sweep` in this process; returns the lines it logged (with `dry`, only the plan)."""
  runs = sweep.plan(spec, workdir, seeds=[0], only=flags[1].split("=")[1].split(","))
  lines = []
  if dry:
    lines.append(sweep.describe_together(runs, workdir))
    return lines
  sweep.run_together(runs, workdir, log=lines.append)
  return lines


# run axis 4 (data 2): each process holds whole rows, its own runs, which evaluation gathers from both processes;
# run axis 1 (data 8): every run's batch is split over both processes, each feeding its half of every batch.
@pytest.mark.parametrize("run_axis_size", [4, 1])
def test_two_processes_train_the_group_as_one_process_does(tmp_path, stacked, run_axis_size):
  import processes
  runs, _, _ = stacked
  workdir = str(tmp_path / "two")
  flags = ["--together", f"--run_axis_size={run_axis_size}"]
  job = processes.Job(workdir, tmp_path, flags, processes=2, local_devices=4, module="semi_jax.sweep",
                      config=SPEC, name="two")
  assert job.wait(400) == [0, 0], job.describe()
  assert f"mesh run {run_axis_size} x data {8 // run_axis_size}" in job.output(0), job.describe()
  for run in runs:
    mine = os.path.join(workdir, run.variant, f"seed_{run.seed}")
    for a, b in zip(_evals(run.workdir), _evals(mine), strict=True):
      for head in ("standard", "balanced"):
        np.testing.assert_allclose(a[head]["per_class"], b[head]["per_class"], atol=1e-5)
      np.testing.assert_allclose(a["bank_fill"], b["bank_fill"], atol=1e-5)
      np.testing.assert_allclose(a["bank_confidence"], b["bank_confidence"], atol=1e-5)


def test_sweep_refuses_print_commands_with_together(tmp_path):
  flag_values = types.SimpleNamespace(config=SPEC, workdir=str(tmp_path), seeds=None, only=None,
                                      print_commands=True, together=True, run_axis_size=-1)
  with pytest.raises(SystemExit, match="give one of them"):
    sweep.main(["sweep"], flag_values)


def test_a_group_resumes_on_8_then_4_then_1_device(tmp_path, monkeypatch):
  """A group stopped and resumed on another device count, hence another padded run count (3 runs padded to 8 on
  a run axis of 8, to 4 on 4, not at all on 1), continues as the uninterrupted group does: the checkpoint holds
  the real runs, and the padding is rebuilt."""
  from semi_jax import preemption
  runs = _runs(str(tmp_path / "resumed"), seeds=[0])
  members = [together.Member(r.config, r.workdir, r.variant) for r in runs]
  group_dir = str(tmp_path / "resumed" / "group")
  for devices, stop_at in ((8, 6), (4, 12), (1, None)):
    monkeypatch.setattr(preemption.Preemption, "reached", lambda self, step, stop_at=stop_at: step == stop_at)
    trainer = together.GroupTrainer(members, group_dir, together.make_mesh(devices, 1, jax.devices()[:devices]))
    assert trainer.runs == {8: 8, 4: 4, 1: 3}[devices]
    summaries = trainer.run()
    assert all(s.get("preempted") for s in summaries) == (stop_at is not None)
  state = jax.device_get(trainer.state)
  monkeypatch.setattr(preemption.Preemption, "reached", lambda self, step: False)
  reference_runs = _runs(str(tmp_path / "uninterrupted"), seeds=[0])
  reference = together.GroupTrainer([together.Member(r.config, r.workdir, r.variant) for r in reference_runs],
                                    str(tmp_path / "uninterrupted" / "group"),
                                    together.make_mesh(1, 1, jax.devices()[:1]))
  reference.run()
  expected = jax.device_get(reference.state)
  assert _max_diff(state, expected) < 1e-5  # as stacked runs equal the runs trained alone
  for run, ref in zip(runs, reference_runs):
    for a, b in zip(_evals(run.workdir), _evals(ref.workdir), strict=True):
      assert a["step"] == b["step"]
      np.testing.assert_allclose(a["balanced"]["per_class"], b["balanced"]["per_class"], atol=1e-5)
