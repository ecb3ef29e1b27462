"""bfloat16 compute (model.dtype=bfloat16): SeMi steps run, the loss stays finite and close to float32's."""
import functools

import jax
import numpy as np
import pytest

from configs import test as test_config
from semi_jax import input_pipeline, sharding, train
from semi_jax.models import create_model
from semi_jax.train_step import StepContext, train_step


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return train.Trainer(test_config.get_config(), str(tmp_path_factory.mktemp("f32")))


def _bf16_context(trainer) -> StepContext:
  config = test_config.get_config()
  config.model.dtype = "bfloat16"
  return StepContext(model=create_model(config.model, trainer.num_classes), tx=trainer.tx, config=config,
                     class_prior=trainer.ctx.class_prior, mean=trainer.ctx.mean, std=trainer.ctx.std)


def test_bfloat16_steps_track_float32(trainer):
  mesh = trainer.mesh
  repl = sharding.replicated(mesh)
  batches = [sharding.to_global(b, mesh) for _, b in zip(range(3), input_pipeline.as_numpy(
      input_pipeline.train_dataset(trainer.data, trainer.config)))]
  results = {}
  for name, ctx in (("float32", trainer.ctx), ("bfloat16", _bf16_context(trainer))):
    step = jax.jit(functools.partial(train_step, ctx=ctx), out_shardings=(repl, repl))
    state = jax.device_put(jax.device_get(trainer.state), repl)  # the same float32 parameters for both
    outs = []
    for b in batches:
      state, out = step(state, b, trainer.step_rng)
      outs.append(jax.device_get(out))
    results[name] = (jax.device_get(state), outs)

  (s32, o32), (s16, o16) = results["float32"], results["bfloat16"]
  # Parameters, optimiser state and BN statistics stay float32 under bfloat16 compute.
  for leaf in jax.tree.leaves(s16.params) + jax.tree.leaves(s16.batch_stats):
    assert leaf.dtype == np.float32
  for out in o16:
    assert np.isfinite(out["loss"])
  for leaf in jax.tree.leaves(s16.params):
    assert np.all(np.isfinite(leaf))
  # Same parameters, same batch: the first step's losses differ only by bfloat16 rounding.
  first32, first16 = o32[0], o16[0]
  assert first16["loss"] == pytest.approx(first32["loss"], rel=0.01)
  assert first16["loss"] != first32["loss"], "the bfloat16 step should really compute in bfloat16"
  # After three steps the runs still agree closely.
  assert o16[-1]["loss"] == pytest.approx(o32[-1]["loss"], rel=0.03)

