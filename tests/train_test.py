"""End-to-end: the train step on 1 vs 8 devices, no host transfers and no input reshuffle inside it, the loop's
one dispatch per step, a run that resumes."""
import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from step_helpers import packed, program, run_steps, view_batches

from configs import test as test_config
from semi_jax import algorithms, outputs, sharding, train
from semi_jax import program as program_lib
from semi_jax import train_step as steps


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return train.Trainer(test_config.get_config(), str(tmp_path_factory.mktemp("trainer")))


def tiny_resnet_config():
  """The test config with a ResNet of bottleneck blocks (1, 1, 1, 1) and base width 4 (D = 128) instead of the WRN,
  on 16x16 images (last stage 2x2) and with a tenth of the learning rate: the untrained tiny ResNet's gradients
  (norm ~25) otherwise turn float rounding between meshes into visibly different second steps."""
  config = test_config.get_config()
  config.data.image_size = 16
  config.optim.lr = 0.003
  config.model.name, config.model.blocks, config.model.block, config.model.base_width = "resnet", (1, 1, 1, 1), \
      "bottleneck", 4
  config.model.bn_momentum = 0.9
  return config


@pytest.fixture(scope="module")
def resnet_trainer(tmp_path_factory):
  return train.Trainer(tiny_resnet_config(), str(tmp_path_factory.mktemp("resnet_trainer")))


@pytest.mark.parametrize("which, steps", [("trainer", 3), ("resnet_trainer", 1)], ids=["wide_resnet", "resnet"])
def test_steps_equal_on_1_and_8_devices(which, steps, request):
  """Full SeMi steps (bank, miner, prototypes, Lcons active from the second) on 1 and 8 devices, with the
  WideResNet and with the ResNet: both fit the objective, the bank and the sharded step. (One ResNet step: its
  ReLUs have no leaky slope, and the untrained tiny ResNet puts many pre-activations within rounding of the kink;
  on some CPUs (AMD EPYC VMs) the 1e-7 difference between the meshes crosses it in the second step, which moves
  that step's gradients by 1e-3.)"""
  trainer = request.getfixturevalue(which)
  assert jax.device_count() == 8
  assert type(trainer.program.ctx.model).__name__ == {"trainer": "WideResNet", "resnet_trainer": "ResNet"}[which]
  batches = view_batches(trainer, steps)
  s1, o1 = run_steps(trainer, sharding.make_mesh(devices=jax.devices()[:1]), batches)
  s8, o8 = run_steps(trainer, sharding.make_mesh(), batches)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    assert np.all(np.isfinite(np.asarray(a, np.float64)))
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-4, atol=2e-5)
  for a, b in zip(o1, o8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  assert int(s8.step) == steps
  assert np.asarray(s8.semi.bank.filled).any(), "the bank should hold entries"
  assert o8[-1]["plce_weight"] > 0 or not trainer.config.plce.enabled or steps == 1  # mixing from the 2nd step


def test_bank_dtype_sets_the_stored_feature_dtype(trainer):
  """bank.dtype reaches the train state: bfloat16 features in the bank, everything else of the state unchanged."""
  config = test_config.get_config()
  config.bank.dtype = "bfloat16"
  state = jax.eval_shape(program(trainer, trainer.mesh, config).init_state, jax.random.key(0))
  default = jax.eval_shape(trainer.program.init_state, jax.random.key(0))
  assert state.semi.bank.feats.dtype == jnp.bfloat16 and default.semi.bank.feats.dtype == jnp.float32
  assert state.semi.bank.feats.shape == default.semi.bank.feats.shape == (10, 4, trainer.program.ctx.model.feature_dim)
  rest = lambda s: jax.tree.leaves(s.replace(semi=s.semi.replace(bank=s.semi.bank.replace(feats=None))))
  assert [(a.shape, a.dtype) for a in rest(state)] == [(a.shape, a.dtype) for a in rest(default)]


def test_no_host_transfer_inside_the_step(trainer):
  """The loop's step (guard and metrics included) runs under transfer_guard('disallow') on 8 devices."""
  mesh, program = trainer.mesh, trainer.program
  assert mesh.devices.size == 8
  batches = [sharding.to_global(packed(b, 8), mesh) for b in view_batches(trainer, 2)]
  state = jax.device_put(jax.device_get(trainer.state), sharding.replicated(mesh))
  carry = program.init_carry()
  state, carry = program.train_step(state, carry, batches[0], trainer.step_rng)  # compile outside the guard
  with jax.transfer_guard("disallow"):
    for b in batches:
      state, carry = program.train_step(state, carry, b, trainer.step_rng)
  metrics = jax.device_get(carry["metrics"]).compute()
  assert int(jax.device_get(carry["metrics"]).loss.count) == 3 and np.isfinite(float(metrics["loss"]))


def _collectives(hlo_text):
  return re.findall(r"= \S+ (all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter)(?:-start)?\(",
                    hlo_text)


def test_the_input_is_not_reshuffled_across_devices(trainer):
  """The compiled 8-device step moves no input between devices: the device-block layout of `images` puts each
  device's rows of every group in its own shard. The same step reading the batch as one block per group (the
  single-device layout) needs collective-permutes: the check can fail."""
  mesh, program = trainer.mesh, trainer.program
  repl = sharding.replicated(mesh)
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), tree)
  args = (abstract(jax.eval_shape(program.init_state, jax.random.key(0))), abstract(jax.eval_shape(program.init_carry)),
          program_lib.batch_spec(trainer.config, mesh), trainer.step_rng)
  ops = _collectives(program.train_step.lower(*args).compile().as_text())
  assert "all-to-all" not in ops and "collective-permute" not in ops, sorted(set(ops))
  assert "all-reduce" in ops  # gradients and BatchNorm statistics

  one_block = functools.partial(steps.guarded_step, ctx=dataclasses.replace(program.ctx, mesh=None),
                                metrics_cls=program.metrics_cls)
  ops = _collectives(jax.jit(one_block, out_shardings=(repl, repl)).lower(*args).compile().as_text())
  assert "collective-permute" in ops or "all-to-all" in ops, sorted(set(ops))


def test_run_writes_metrics_checkpoint_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  config = test_config.get_config()
  summary = train.train_and_evaluate(config, workdir)
  assert summary["step"] == 3 and summary["trained_steps"] == 3
  assert summary["algo"] == "semi" and summary["components"] == algorithms.preset_switches("semi")  # what ran
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert events and os.path.getsize(os.path.join(workdir, events[0])) > 0
  evals = [json.loads(line) for line in open(os.path.join(workdir, outputs.EVAL_LOG))]
  assert [e["step"] for e in evals] == [2, 3]
  assert len(evals[-1]["balanced"]["per_class"]) == 10
  # Pseudo-label quality since the previous evaluation: steps 1-2, then step 3 alone (16 unlabeled rows a step;
  # the test config's threshold keeps nearly every pseudo-label confident), so the sums were reset in between.
  first, second = (e["pseudo_labels"] for e in evals)
  assert 16 < first["confident"] <= 32 and 0 < second["confident"] <= 16
  for pl in (first, second):
    assert sum(pl["true"]) == pytest.approx(1.0) and sum(pl["estimated"]) == pytest.approx(1.0)
    assert 0 <= pl["tv_distance"] <= 1 and len(pl["precision"]) == 10
  assert summary["pseudo_labels"]["confident"] == second["confident"]
  import tensorflow as tf
  tags = {v.tag for name in events for record in tf.data.TFRecordDataset(os.path.join(workdir, name))
          for v in tf.compat.v1.Event.FromString(record.numpy()).summary.value}
  assert {"eval/confusion_matrix", "eval/per_class_accuracy", "eval/gm", "pseudo/tv_distance",
          "pseudo_class/precision_000"} <= tags, sorted(tags)
  # A second invocation finds the finished run: it resumes at step 3 and trains nothing more.
  again = train.train_and_evaluate(config, workdir)
  assert again["step"] == 3 and again["trained_steps"] == 0
  assert again["balanced_acc"] == pytest.approx(summary["balanced_acc"])
  # Extending the run (a changed schedule length: only when allowed) continues from the checkpoint of step 3.
  config.train.total_steps = 5
  with pytest.raises(ValueError, match="train.total_steps: 3 -> 5"):
    train.train_and_evaluate(config, workdir)
  config.allow_config_change = True
  more = train.train_and_evaluate(config, workdir)
  assert more["step"] == 5 and more["trained_steps"] == 2


def test_validation_set_is_evaluated_and_selects_the_reported_evaluation(tmp_path):
  config = test_config.get_config()
  config.data.val_per_class = 4
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  evals = [json.loads(line) for line in open(tmp_path / "run" / outputs.EVAL_LOG)]
  assert [e["step"] for e in evals] == [2, 3]
  for e in evals:
    val = e["validation"][e["reported"]]
    assert len(val["per_class"]) == 10 and 0 <= val["balanced_acc"] <= 100
    assert val["per_class"] != e[e["reported"]]["per_class"] or val["acc"] != e[e["reported"]]["acc"]
  chosen = summary["selected_by_validation"]
  best = max(range(2), key=lambda i: (evals[i]["validation"]["balanced"]["balanced_acc"], i))  # ties: the later
  assert chosen["step"] == evals[best]["step"]
  assert chosen["balanced_acc"] == evals[best]["balanced"]["balanced_acc"]
