"""What must hold on every host of a pod together, checked with two processes (2 x 4 fake CPU devices):

* a SIGTERM or SIGINT to ONE process stops both at the same step, both save one checkpoint together and exit 0
  within a bounded time, and the resumed run is bitwise equal to an uninterrupted one;
* the restore is decided together: a transient read error on one process is retried and both start from the
  same step; a persistent one stops both with a message naming the path, moving nothing; a content error on
  one process moves the checkpoint aside and both fall back to the same older step;
* elastic resume: a checkpoint of 2 processes x 4 devices (or of 8 devices) continues on 4, 2 or 1 device;
* sub-meshes: mesh.data_axis_size=4 over 2 processes (2 devices each) trains like 4 devices in one process,
  and sizes that cannot be split evenly are refused before anything is compiled.
"""
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from processes import Job

from configs import test as test_config
from semi_jax import checkpointing, config_validation, outputs, sharding, train

STEPS = 24
# A checkpoint every step: the uninterrupted run holds the reference state of whichever step a signal stops at.
FLAGS = (f"--config.train.total_steps={STEPS}", "--config.train.checkpoint_every_steps=1",
         "--config.train.keep_checkpoints=100", "--config.train.eval_every_steps=12",
         "--config.train.log_every_steps=6")
RUN_TIMEOUT_S = 300
EXIT_BOUND_S = 60  # from the signal to the exit of both processes (seconds on a busy 2-core machine)


def _config(**train_fields):
  config = test_config.get_config()
  config.train.total_steps = STEPS
  config.train.checkpoint_every_steps = 1
  config.train.keep_checkpoints = 100
  config.train.eval_every_steps = 12
  config.train.log_every_steps = 6
  for k, v in train_fields.items():
    config.train[k] = v
  return config


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _run(workdir, logdir, name, flags=FLAGS, fault=None, expect=0):
  job = Job(workdir, logdir, flags, fault=fault, name=name)
  codes = job.wait(RUN_TIMEOUT_S)
  assert codes == [expect, expect], f"exit codes {codes}, expected {expect}:\n{job.describe()}"
  return job


def _started_from(job):
  return [[int(s) for s in re.findall(r"Training from step (\d+) ", job.output(i))] for i in range(2)]


def _restore(workdir, template, step=None):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 100)
  try:
    return jax.device_get(ckpt.restore(template, step=step)[1])
  finally:
    ckpt.close()


def _assert_bitwise(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _evals(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, outputs.EVAL_LOG))]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
  return train.Trainer(_config(), str(tmp_path_factory.mktemp("template"))).state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Two processes trained STEPS steps without interruption; its checkpoints are the references."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  _run(workdir, os.path.dirname(workdir), "uninterrupted")
  assert _steps(workdir)[-1] == STEPS
  return workdir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_one_process_stops_both_and_the_resumed_run_is_bitwise_equal(
    tmp_path, uninterrupted, template, signum):
  workdir = str(tmp_path / "run")
  job = Job(workdir, tmp_path, FLAGS, name="preempted")
  t0 = time.monotonic()
  while not _steps(workdir) and time.monotonic() - t0 < RUN_TIMEOUT_S and None in [p.poll() for p in job.procs]:
    time.sleep(0.02)
  sent = job.signal(1, signum)  # only process 1, as a preemption notice may reach one host first
  codes = job.wait(RUN_TIMEOUT_S)
  assert codes == [0, 0], f"exit codes {codes}:\n{job.describe()}"
  assert max(job.exit_times) - sent < EXIT_BOUND_S, (max(job.exit_times) - sent, job.describe())
  stopped = [re.findall(r"stopped after step (\d+) and saved a checkpoint", job.output(i)) for i in range(2)]
  assert stopped[0] and stopped[0] == stopped[1], (stopped, job.describe())
  step = int(stopped[0][0])
  assert step < STEPS, "the run ended before the signal took effect; raise STEPS"
  assert _steps(workdir)[-1] == step and not os.path.exists(os.path.join(workdir, outputs.SUMMARY))
  _assert_bitwise(_restore(workdir, template, step), _restore(uninterrupted, template, step))
  if signum != signal.SIGTERM:
    return  # the resume below does not depend on the signal

  # Resume, with the first read of every checkpoint failing on process 1 (retried): both start at `step`.
  job = _run(workdir, tmp_path, "resumed", fault=(1, "transient"))
  assert _started_from(job) == [[step], [step]], job.describe()
  assert "retrying in" in job.output(1)
  _assert_bitwise(_restore(workdir, template, STEPS), _restore(uninterrupted, template, STEPS))
  assert _evals(workdir) == _evals(uninterrupted)


def test_persistent_read_error_on_one_process_stops_both_and_moves_nothing(tmp_path, uninterrupted):
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, workdir)
  job = _run(workdir, tmp_path, "unreadable", fault=(1, "io"), expect=1)
  path = os.path.join(workdir, "checkpoints", str(STEPS))
  for i in range(2):
    out = job.output(i)
    assert f"checkpoint {path} could not be read by process(es) [1]" in out, out[-3000:]
    assert "Nothing was moved" in out and "Training from step" not in out
  assert "ConnectionResetError: injected" in job.output(1)
  assert _steps(workdir) == _steps(uninterrupted)
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.startswith("corrupt-")]


def test_content_error_on_one_process_moves_it_aside_and_both_fall_back(tmp_path, uninterrupted, template):
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, workdir)
  os.remove(os.path.join(workdir, outputs.SUMMARY))
  job = _run(workdir, tmp_path, "fallback", fault=(1, "content"))
  assert _started_from(job) == [[STEPS - 1], [STEPS - 1]], job.describe()
  moved = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.startswith("corrupt-")]
  assert [n.split("-")[1] for n in moved] == [str(STEPS)], moved
  # The retrained step reproduces the moved checkpoint bit for bit.
  _assert_bitwise(_restore(workdir, template, STEPS), _restore(uninterrupted, template, STEPS))


@pytest.mark.parametrize("devices", [4, 2, 1])
def test_checkpoint_of_two_processes_continues_on_fewer_devices(tmp_path, uninterrupted, template, devices):
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  for s in _steps(workdir):
    if s > STEPS - 4:
      shutil.rmtree(os.path.join(ckpts, str(s)))
  os.remove(os.path.join(workdir, outputs.SUMMARY))
  trainer = train.Trainer(_config(), workdir, mesh=sharding.make_mesh(devices=jax.devices()[:devices]))
  assert trainer.restore() == STEPS - 4
  _assert_bitwise(jax.device_get(trainer.state), _restore(uninterrupted, template, STEPS - 4))  # exact restore
  trainer.run()
  # A different device count changes the order of reductions: equal to float rounding over a few steps.
  for s in range(STEPS - 3, STEPS + 1):
    ours, theirs = _restore(workdir, template, s), _restore(uninterrupted, template, s)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))


# --- sub-meshes ----------------------------------------------------------------------------------------------


class _Device:
  def __init__(self, process_index, local_id):
    self.process_index, self.id = process_index, (process_index, local_id)

  def __repr__(self):
    return f"D{self.id}"


def test_sub_mesh_takes_the_same_number_of_devices_from_every_process():
  devices = [_Device(p, i) for p in range(2) for i in range(4)]
  assert [d.id for d in sharding.mesh_devices(devices, 4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert [d.id for d in sharding.mesh_devices(devices, 2)] == [(0, 0), (1, 0)]
  assert sharding.mesh_devices(devices, -1) == sharding.mesh_devices(devices, 8) == devices
  assert sharding.mesh_devices(devices[:4], 3) == devices[:3]  # one process: its first devices
  assert [d.id for d in sharding.mesh_devices(devices, 6)] == [(p, i) for p in range(2) for i in range(3)]
  for size in (3, 5, 7):
    with pytest.raises(ValueError, match=r"cannot be split evenly over the 2 processes \(4 devices each\).*"
                                         r"\[2, 4, 6, 8\]"):
      sharding.mesh_devices(devices, size)
  with pytest.raises(ValueError, match="9 but 8 devices"):
    sharding.mesh_devices(devices, 9)


def test_trainer_refuses_a_bad_mesh_size_before_compiling(tmp_path):
  config = test_config.get_config()
  config.mesh.data_axis_size = 9
  with pytest.raises(config_validation.ConfigError, match="mesh.data_axis_size=9 but 8 devices"):
    train.Trainer(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_two_processes_on_a_sub_mesh_equal_one_process_on_as_many_devices(tmp_path):
  config = test_config.get_config()
  pair_dir = str(tmp_path / "pair")
  job = _run(pair_dir, tmp_path, "sub_mesh", flags=("--config.mesh.data_axis_size=4",))
  assert "on 4 devices (2 processes)" in job.output(0), job.output(0)[-3000:]
  reference = train.Trainer(config, str(tmp_path / "single"), mesh=sharding.make_mesh(devices=jax.devices()[:4]))
  ref_summary = reference.run()
  pair_summary = json.load(open(os.path.join(pair_dir, outputs.SUMMARY)))
  for k in ("step", "acc", "balanced_acc", "acc_many", "acc_medium", "acc_few"):
    assert pair_summary[k] == pytest.approx(ref_summary[k], abs=1e-6), k
  pair_evals, ref_evals = _evals(pair_dir), _evals(str(tmp_path / "single"))
  assert [e["step"] for e in pair_evals] == [e["step"] for e in ref_evals] == [2, 3]
  for a, b in zip(pair_evals, ref_evals):
    assert a["loss_b"] == pytest.approx(b["loss_b"], rel=1e-4)
  state = _restore(pair_dir, reference.state)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(jax.device_get(reference.state))):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-4, atol=2e-5)
