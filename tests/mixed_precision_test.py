"""bfloat16 compute (model.dtype=bfloat16): SeMi steps run, the loss stays finite and close to float32's."""
import jax
import numpy as np
import pytest
from step_helpers import run_steps, view_batches

from configs import test as test_config
from semi_jax import train


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return train.Trainer(test_config.get_config(), str(tmp_path_factory.mktemp("f32")))


@pytest.mark.parametrize("cpu_fast_paths", ["off", "on"])
def test_bfloat16_steps_track_float32(trainer, cpu_fast_paths):
  """With flax's layers (what TPUs and GPUs run) and with the CPU fast paths."""
  batches = view_batches(trainer, 3)
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = test_config.get_config()
    config.model.dtype, config.cpu_fast_paths = dtype, cpu_fast_paths
    # The same float32 parameters for both.
    results[dtype] = run_steps(trainer, trainer.mesh, batches, config=config)

  (_, o32), (s16, o16) = results["float32"], results["bfloat16"]
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

