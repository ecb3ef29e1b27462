import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semi_jax import config_files, models
from semi_jax.models.resnet import ResNet
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


def _assert_same_variables_and_outputs(flax_model, cpu_model, x, tol: float):
  """The same variable names, shapes and initial values, and outputs within `tol` in eval and train mode."""
  variables = flax_model.init(jax.random.key(0), x, train=False)
  cpu_variables = cpu_model.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(cpu_variables)
  jax.tree.map(np.testing.assert_array_equal, variables, cpu_variables)
  for train in (False, True):
    got = cpu_model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
    want = flax_model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), got, want)


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
  _assert_same_variables_and_outputs(flax_model, cpu_model, x, tol=1e-5)


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


# --- ResNet ------------------------------------------------------------------------------------------------


def _resnet_reference_count(blocks, block, base, num_classes):
  """ResNet parameters counted by hand: stem conv + BN, each block's convs and BNs, 1x1 conv + BN shortcuts
  where the stride or the width changes, two heads."""
  expansion = 4 if block == "bottleneck" else 1
  total = 3 * base * 9 + 2 * base
  c_in = base
  for stage, count in enumerate(blocks):
    w = base * 2 ** stage
    for i in range(count):
      stride = 2 if stage > 0 and i == 0 else 1
      if block == "bottleneck":
        total += c_in * w + 9 * w * w + w * 4 * w + 2 * (w + w + 4 * w)
      else:
        total += 9 * c_in * w + 9 * w * w + 2 * (w + w)
      if stride != 1 or c_in != w * expansion:
        total += c_in * w * expansion + 2 * w * expansion
      c_in = w * expansion
  return total + 2 * (c_in * num_classes + num_classes)


@pytest.mark.parametrize("cpu_fast_paths", [False, True])
@pytest.mark.parametrize("blocks,block,base", [((1, 1, 1, 1), "bottleneck", 8), ((2, 1, 1, 2), "basic", 4),
                                               ((1, 2, 1, 1), "bottleneck", 4)])
def test_resnet_param_count_matches_hand_count(blocks, block, base, cpu_fast_paths):
  model = ResNet(10, blocks, block, base, cpu_fast_paths=cpu_fast_paths)
  assert _param_count(model, size=16) == _resnet_reference_count(blocks, block, base, 10)


def test_resnet50_for_imagenet127_is_the_reference_count():
  """The imagenet127 config builds ResNet-50 with D = 2048. The reference's ResNet50(num_classes=127) has
  24,028,994 parameters, 8,196 of them in its rotation head `rot` (2048 x 4 + 4), which SeMi never uses."""
  config = config_files.load(config_files.repo_config("imagenet127") + ":size=64")
  model = models.create_model(config.model, 127)
  assert isinstance(model, ResNet) and model.feature_dim == 2048 and model.bn_momentum == 0.9
  assert _param_count(model, size=64) == 24_028_994 - 8_196 == _resnet_reference_count((3, 4, 6, 3), "bottleneck",
                                                                                        64, 127)


def test_resnet_cpu_fast_paths_layers_have_flax_variables_and_outputs():
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  flax_model = ResNet(7, (1, 2, 1, 1), "bottleneck", 4)
  cpu_model = flax_model.clone(cpu_fast_paths=True)
  # The last stage is 1x1 here: its train-mode BatchNorm normalises over 4 values, which amplifies rounding.
  _assert_same_variables_and_outputs(flax_model, cpu_model, x, tol=1e-4)


def test_resnet_shapes_strides_and_batch_norm_decay():
  model = ResNet(7, (1, 1, 1, 1), "bottleneck", 4)
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  (logits, logits_b, feats), state = model.apply(variables, x, train=False, capture_intermediates=True)
  assert logits.shape == logits_b.shape == (3, 7) and feats.shape == (3, model.feature_dim) == (3, 128)
  # Stem at full resolution (no max-pool), then strides 1, 2, 2, 2: 16 -> 16, 8, 4, 2.
  sides = [state["intermediates"][f"layer{s}_0"]["__call__"][0].shape[1:] for s in (1, 2, 3, 4)]
  assert sides == [(16, 16, 16), (8, 8, 32), (4, 4, 64), (2, 2, 128)]
  assert np.all(np.asarray(feats) >= 0)  # pooled after a ReLU
  # One train-mode pass moves every running mean by (1 - 0.9) of the batch mean: decay 0.9, torch momentum 0.1.
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  stem = model.apply(variables, x, train=False, capture_intermediates=lambda m, _: m.name == "conv1",
                     mutable=["intermediates"])[1]["intermediates"]["conv1"]["__call__"][0]
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], 0.1 * np.mean(stem, axis=(0, 1, 2)), rtol=1e-5,
                             atol=1e-7)


def test_resnet_init_statistics_follow_reference():
  model = ResNet(10, (1, 1, 1, 2), base_width=16)
  params = jax.jit(lambda: model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)), train=False))()["params"]
  kernel = np.asarray(params["layer4_1"]["conv2"]["kernel"])  # 3x3x128x128, kaiming fan_out = 9*128
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.02)
  fc = np.asarray(params["fc1"]["kernel"])  # xavier normal
  np.testing.assert_allclose(fc.std(), np.sqrt(2.0 / (512 + 10)), rtol=0.05)
  assert np.all(np.asarray(params["fc"]["bias"]) == 0)
  bn = params["layer3_0"]["shortcut_bn"]
  assert np.all(np.asarray(bn["scale"]) == 1) and np.all(np.asarray(bn["bias"]) == 0)


def test_bad_resnet_blocks_are_clear_errors():
  with pytest.raises(ValueError, match="4 counts >= 1"):
    ResNet(10, (3, 4, 6)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="block must be one of"):
    ResNet(10, block="wide").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
