"""End-to-end: the train step on 1 vs 8 devices, no host transfers inside it, a run that resumes."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from semi_jax import input_pipeline, sharding, train
from semi_jax.train_step import train_step


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return train.Trainer(test_config.get_config(), str(tmp_path_factory.mktemp("trainer")))


def _batches(trainer, n):
  ds = input_pipeline.train_dataset(trainer.data, trainer.config)
  return [b for _, b in zip(range(n), input_pipeline.as_numpy(ds))]


def _run_steps(trainer, mesh, batches, state):
  repl = sharding.replicated(mesh)
  ctx = dataclasses.replace(trainer.ctx, mesh=mesh)
  step = jax.jit(functools.partial(train_step, ctx=ctx), out_shardings=(repl, repl))
  state = jax.device_put(jax.device_get(state), repl)
  outs = []
  for b in batches:
    state, out = step(state, sharding.to_global(b, mesh), trainer.step_rng)
    outs.append(out)
  return jax.device_get(state), jax.device_get(outs)


def test_steps_equal_on_1_and_8_devices(trainer):
  """Two full SeMi steps (bank, miner, prototypes, Lcons active from the second) on 1 and 8 devices."""
  assert jax.device_count() == 8
  batches = _batches(trainer, 3)
  init = trainer.state
  s1, o1 = _run_steps(trainer, sharding.make_mesh(devices=jax.devices()[:1]), batches, init)
  s8, o8 = _run_steps(trainer, sharding.make_mesh(), batches, init)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    assert np.all(np.isfinite(np.asarray(a, np.float64)))
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-4, atol=2e-5)
  for a, b in zip(o1, o8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  assert int(s8.step) == 3
  assert np.asarray(s8.semi.bank.filled).any(), "the bank should hold entries after 3 steps"
  assert o8[-1]["plce_weight"] > 0 or not trainer.config.plce.enabled


def test_no_host_transfer_inside_the_step(trainer):
  mesh = trainer.mesh
  batches = [sharding.to_global(b, mesh) for b in _batches(trainer, 2)]
  repl = sharding.replicated(mesh)
  state = jax.device_put(jax.device_get(trainer.state), repl)
  ctx = dataclasses.replace(trainer.ctx, mesh=mesh)
  step = jax.jit(functools.partial(train_step, ctx=ctx), out_shardings=(repl, repl))
  step(state, batches[0], trainer.step_rng)  # compile outside the guard
  with jax.transfer_guard("disallow"):
    for b in batches:
      state, out = step(state, b, trainer.step_rng)
  assert np.isfinite(float(out["loss"]))


def test_run_writes_metrics_checkpoint_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  config = test_config.get_config()
  summary = train.train_and_evaluate(config, workdir)
  assert summary["step"] == 3 and summary["trained_steps"] == 3
  assert 0.0 <= summary["balanced_acc"] <= 100.0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert events and os.path.getsize(os.path.join(workdir, events[0])) > 0
  evals = [json.loads(line) for line in open(os.path.join(workdir, train.EVAL_LOG))]
  assert [e["step"] for e in evals] == [2, 3]
  assert len(evals[-1]["balanced"]["per_class"]) == 10
  # A second invocation finds the finished run: it resumes at step 3 and trains nothing more.
  again = train.train_and_evaluate(config, workdir)
  assert again["step"] == 3 and again["trained_steps"] == 0
  assert again["balanced_acc"] == pytest.approx(summary["balanced_acc"])
  # Extending the run continues from the checkpoint of step 3.
  config.train.total_steps = 5
  more = train.train_and_evaluate(config, workdir)
  assert more["step"] == 5 and more["trained_steps"] == 2
