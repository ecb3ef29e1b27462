"""Data parallelism across devices and processes gives the same training as one device.

* one process, 1 / 2 / 4 / 8 devices: two full SeMi steps (memory bank, miner, prototypes active in the second)
  give the same state and outputs;
* two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives), 4 fake devices each, train the tiny
  config through `python -m semi_jax.main`: metrics, evaluations and the final checkpoint equal a
  single-process 8-device run, and that checkpoint restores in a single process;
* `distributed.plan` reads the environment as documented.
"""
import json
import os

import jax
import numpy as np
import pytest

import processes
from step_helpers import run_steps, view_batches

from configs import test as test_config
from semi_jax import distributed, outputs, sharding, train

PROCESSES, LOCAL_DEVICES = 2, 4
CHILD_TIMEOUT_S = 240


def _assert_trees_close(a, b, rtol=1e-4, atol=2e-5):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return train.Trainer(test_config.get_config(), str(tmp_path_factory.mktemp("trainer")))


@pytest.fixture(scope="module")
def one_device_run(trainer):
  batches = view_batches(trainer, 2)
  return batches, run_steps(trainer, sharding.make_mesh(devices=jax.devices()[:1]), batches)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_semi_steps_equal_on_n_devices(trainer, one_device_run, n):
  batches, (s1, o1) = one_device_run
  sn, on = run_steps(trainer, sharding.make_mesh(devices=jax.devices()[:n]), batches)
  _assert_trees_close(sn, s1)
  for a, b in zip(on, o1):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=2e-5, err_msg=k)
  assert np.asarray(sn.semi.bank.filled).any(), "the memory bank should hold entries after two steps"


# --- two processes -------------------------------------------------------------------------------------------


def _run_pair(workdir: str, logdir) -> None:
  """`python -m semi_jax.main` as two processes of one job; kills both if either fails or hangs."""
  job = processes.Job(workdir, logdir, processes=PROCESSES, local_devices=LOCAL_DEVICES)
  codes = job.wait(CHILD_TIMEOUT_S)
  if codes != [0] * PROCESSES:
    pytest.fail(f"the two-process run failed (exit codes {codes}, None: killed after {CHILD_TIMEOUT_S}s):\n"
                + job.describe())


def _train_scalars(workdir: str) -> dict:
  """{(step, tag): value} of the train/* scalars in the TensorBoard event file of `workdir`."""
  import tensorflow as tf
  out = {}
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents"):
      continue
    for record in tf.data.TFRecordDataset(os.path.join(workdir, name)).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      for v in event.summary.value:
        if v.tag.startswith("train/"):
          out[(event.step, v.tag)] = float(tf.make_ndarray(v.tensor))
  return out


def test_two_processes_equal_one_process(tmp_path):
  config = test_config.get_config()
  pair_dir, ref_dir = str(tmp_path / "pair"), str(tmp_path / "single")
  _run_pair(pair_dir, tmp_path)

  reference = train.Trainer(config, ref_dir)
  assert reference.mesh.devices.size == PROCESSES * LOCAL_DEVICES
  ref_summary = reference.run()

  # Metrics: training scalars of every step, the evaluations and the final summary.
  pair_scalars, ref_scalars = _train_scalars(pair_dir), _train_scalars(ref_dir)
  assert ref_scalars and sorted(pair_scalars) == sorted(ref_scalars)
  for key, value in ref_scalars.items():
    assert pair_scalars[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
  read_evals = lambda d: [json.loads(line) for line in open(os.path.join(d, outputs.EVAL_LOG))]
  pair_evals, ref_evals = read_evals(pair_dir), read_evals(ref_dir)
  assert [e["step"] for e in pair_evals] == [e["step"] for e in ref_evals] == [2, 3]
  for a, b in zip(pair_evals, ref_evals):
    assert a["loss_b"] == pytest.approx(b["loss_b"], rel=1e-4)
    np.testing.assert_allclose(a["balanced"]["per_class"], b["balanced"]["per_class"], atol=1e-6)
    np.testing.assert_allclose(a["bank_confidence"], b["bank_confidence"], rtol=1e-4, atol=1e-6)
  pair_summary = json.load(open(os.path.join(pair_dir, outputs.SUMMARY)))
  for k in ("step", "acc", "balanced_acc", "acc_many", "acc_medium", "acc_few"):
    assert pair_summary[k] == pytest.approx(ref_summary[k], abs=1e-6), k

  # The checkpoint the two processes wrote together restores in this single 8-device process.
  restored = train.Trainer(config, pair_dir)
  assert restored.restore() == config.train.total_steps
  _assert_trees_close(jax.device_get(restored.state), jax.device_get(reference.state))
  assert np.asarray(jax.device_get(restored.state.semi.bank.filled)).any()


# --- environment -------------------------------------------------------------------------------------------


def test_plan_reads_the_environment():
  explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.plan(explicit, tpu_chips_present=False) == distributed.Plan("10.0.0.2:1234", 4, 3)
  assert distributed.plan({}, tpu_chips_present=False) is None
  slurm = {"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "node[01-04]"}
  assert distributed.plan({**slurm, "SLURM_NTASKS": "1"}, tpu_chips_present=False) is None
  assert distributed.plan({"SLURM_NTASKS": "16"}, tpu_chips_present=False) is None  # sbatch script, no srun
  auto = distributed.Plan()
  assert distributed.plan({**slurm, "SLURM_NTASKS": "16"}, tpu_chips_present=False) == auto
  assert distributed.plan({}, tpu_chips_present=True) == auto
  assert distributed.plan({"JAX_PLATFORMS": "cpu"}, tpu_chips_present=True) is None
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a,b"}, tpu_chips_present=False) == auto
  assert distributed.plan({"SEMI_JAX_DISTRIBUTED": "1"}, tpu_chips_present=False) == auto
  assert distributed.plan({**explicit, "SEMI_JAX_DISTRIBUTED": "0"}, tpu_chips_present=True) is None


@pytest.mark.parametrize("environ, message", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "needs a port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "must lie in"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
    ({"SEMI_JAX_DISTRIBUTED": "yes"}, "use 1"),
])
def test_plan_rejects_bad_environment(environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.plan(environ, tpu_chips_present=False)


def test_single_process_needs_no_initialisation(monkeypatch):
  cluster_vars = (distributed.SWITCH_VAR, "SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES")
  for var in distributed.EXPLICIT_VARS + cluster_vars:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert distributed.maybe_initialize() is False
  assert jax.process_count() == 1
