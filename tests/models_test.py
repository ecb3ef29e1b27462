import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semi_jax.models.wide_resnet import WideResNet


def _param_count(model, size=32):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def _reference_count(depth, width, num_classes, channels_in=3):
  """WideResNet parameters counted by hand from the architecture (two heads, no discarded BatchNorm)."""
  n = (depth - 4) // 6
  ch = [16, 16 * width, 32 * width, 64 * width]
  total = channels_in * ch[0] * 9
  for stage in range(3):
    cin, cout = ch[stage], ch[stage + 1]
    for i in range(n):
      c_in = cin if i == 0 else cout
      total += c_in * cout * 9 + cout * cout * 9 + 2 * cout  # conv1, conv2, bn2
      if c_in != cout:
        total += c_in * cout  # 1x1 shortcut
        if stage == 0:
          total += 2 * c_in  # bn1 of activate_before_residual
      else:
        total += 2 * c_in
  total += 2 * ch[3]  # final bn
  total += 2 * (ch[3] * num_classes + num_classes)  # fc and fc1
  return total


@pytest.mark.parametrize("cpu_fast_paths", [False, True])
@pytest.mark.parametrize("depth,width", [(28, 2), (10, 1), (16, 4)])
def test_param_count_matches_hand_count(depth, width, cpu_fast_paths):
  model = WideResNet(10, depth, width, cpu_fast_paths=cpu_fast_paths)
  assert _param_count(model) == _reference_count(depth, width, 10)


def test_the_cpu_fast_paths_layers_have_flax_variables_and_outputs():
  """Same variable names, shapes and initial values with semi_jax.cpu's layers as with flax's, so checkpoints
  and converted weights load into either; and the same outputs in eval and train mode."""
  x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
  flax_model, cpu_model = WideResNet(7, 10, 2), WideResNet(7, 10, 2, cpu_fast_paths=True)
  variables = flax_model.init(jax.random.key(0), x, train=False)
  cpu_variables = cpu_model.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(cpu_variables)
  jax.tree.map(np.testing.assert_array_equal, variables, cpu_variables)
  for train in (False, True):
    got = cpu_model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
    want = flax_model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_wrn_28_2_is_about_1_47m():
  count = _param_count(WideResNet(10, 28, 2))
  # 1,467,610 for FixMatch's single-head WRN-28-2, + 1,290 for the balanced head fc1, - 192 for the two
  # BatchNorms the reference computes and discards (it stores them; they change no output).
  assert count == 1_467_610 + 1_290 - 192


def test_output_shapes_and_feature_dim():
  model = WideResNet(7, 10, 2)
  x = jnp.ones((3, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, logits_b, feats = model.apply(variables, x, train=False)
  assert logits.shape == logits_b.shape == (3, 7)
  assert feats.shape == (3, model.feature_dim) == (3, 128)
  (logits_t, _, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits_t.shape == (3, 7)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
  assert any(jax.tree.leaves(changed))


def test_init_statistics_follow_reference():
  model = WideResNet(10, 28, 2)
  params = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  kernel = np.asarray(params["block3_1"]["conv2"]["kernel"])  # 3x3x128x128, fan_out = 9*128
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.05)
  fc = np.asarray(params["fc"]["kernel"])  # xavier normal: std sqrt(2 / (fan_in + fan_out))
  np.testing.assert_allclose(fc.std(), np.sqrt(2.0 / (128 + 10)), rtol=0.2)
  assert np.all(np.asarray(params["fc1"]["bias"]) == 0)
  assert np.all(np.asarray(params["bn1"]["scale"]) == 1) and np.all(np.asarray(params["bn1"]["bias"]) == 0)


def test_bad_depth_is_a_clear_error():
  with pytest.raises(ValueError, match="6n\\+4"):
    WideResNet(10, 27, 2).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
