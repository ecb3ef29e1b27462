"""The ResNet and its converter against the public PyTorch reference (tests/data/reference_resnet.npz and
tests/data/resnet50_state_dict.json; tests/data/README.md says how they were made).

- A reduced ResNet of the reference's family (its own `ResNet`, `_make_layer` and `Bottleneck`, blocks (1, 2, 1, 1)
  at base width 8: strided and identity shortcuts, all four stages) converted from the reference's state_dict, with
  flax's layers and with the CPU fast paths: features and both heads' logits in eval and train mode, and the running
  statistics after one train-mode pass, each within 1e-4.
- The full ResNet-50 of the ImageNet-127 runs: every tensor name of the reference's state_dict maps to a flax
  variable of the right shape, or is a skipped rotation head or an ignored counter, and every flax variable is
  covered.
"""
import functools
import json
import pathlib

import jax
import numpy as np
import pytest

import parity_test
from semi_jax import convert
from semi_jax.models.resnet import ResNet

DATA = pathlib.Path(__file__).parent / "data"
REF = np.load(DATA / "reference_resnet.npz")
TOL = 1e-4
TORCH_MOMENTUM = 0.1  # the reference ResNet's BatchNorm2d default; flax's decay is 1 - 0.1


def reference_state_dict():
  return parity_test.reference_state_dict(REF)


def reference_images():
  return (REF["inputs/images"].astype(np.float32) * REF["inputs/step"]).transpose(0, 2, 3, 1)  # NCHW -> NHWC


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def converted():
  return convert.convert_state_dict(reference_state_dict())


@pytest.fixture(scope="module", params=[False, True], ids=["flax_layers", "cpu_fast_paths"])
def model(request):
  return ResNet(num_classes=int(REF["settings/num_classes"]), blocks=tuple(int(b) for b in REF["settings/blocks"]),
                block="bottleneck", base_width=int(REF["settings/base_width"]), cpu_fast_paths=request.param)


def test_converter_recognises_the_reference_resnet(converted):
  _, report = converted
  assert report.architecture == convert.ResNetArchitecture(blocks=(1, 2, 1, 1), block="bottleneck", base_width=8,
                                                           num_classes=10)
  assert report.skipped == [("rot.weight, rot.bias (the rotation head the reference builds and SeMi never trains "
                             "or reads)")]
  assert report.ignored_counters == 1 + 3 * 5 + 4  # stem; 5 blocks of 3 BNs; a shortcut BN in each stage's first


def test_eval_and_train_mode_outputs_match(converted, model):
  variables, _ = converted
  for mode in ("eval", "train"):
    train = mode == "train"
    apply = functools.partial(model.apply, train=train, mutable=["batch_stats"] if train else False)
    out = jax.jit(apply)(variables, reference_images())
    logits, logits_b, feats = out[0] if train else out
    assert max_diff(feats, REF[f"{mode}/features"]) < TOL, mode
    assert max_diff(logits, REF[f"{mode}/logits"]) < TOL, mode
    assert max_diff(logits_b, REF[f"{mode}/logits_b"]) < TOL, mode
  assert max_diff(logits, REF["eval/logits"]) > 0.1  # train mode normalises with the batch statistics


def _bn_values_per_channel(images):
  """torch BN name -> values per channel n = batch * H * W, from the architecture: a bottleneck's bn1 runs at its
  input's side, bn2, bn3 and the shortcut's BN after the block's stride."""
  batch, side = images.shape[0], images.shape[1]
  n = {"bn1": batch * side ** 2}
  for stage, (count, stride) in enumerate(zip(REF["settings/blocks"], (1, 2, 2, 2)), start=1):
    for i in range(int(count)):
      out_side = side // (stride if i == 0 else 1)
      n[f"layer{stage}.{i}.bn1"] = batch * side ** 2
      for name in ("bn2", "bn3", "shortcut.1"):
        n[f"layer{stage}.{i}.{name}"] = batch * out_side ** 2
      side = out_side
  return n


def test_running_statistics_after_one_train_pass_match(converted, model):
  variables, _ = converted
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables,
                                                                                            reference_images())
  names = convert.torch_to_flax_names(convert.infer_architecture(reference_state_dict()))
  sd = reference_state_dict()
  values = _bn_values_per_channel(reference_images())
  checked = 0
  for torch_name, (path, _) in names.items():
    if not torch_name.endswith("running_var"):
      continue
    layer = torch_name[: -len(".running_var")]
    node = updates
    for part in path[:-1]:
      node = node[part]
    mean1, var1 = REF[f"train/running/{layer}.running_mean"], REF[f"train/running/{layer}.running_var"]
    var0, n = sd[f"{layer}.running_var"], values[layer]
    assert max_diff(node["mean"], mean1) < TOL, layer
    # torch averages in the unbiased batch variance, flax the biased one: (n - 1) / n of it.
    expected_var = (1 - TORCH_MOMENTUM) * var0 + (var1 - (1 - TORCH_MOMENTUM) * var0) * (n - 1) / n
    assert max_diff(node["var"], expected_var) < TOL, layer
    checked += 1
  assert checked == len(jax.tree.leaves(updates)) // 2 == 20


def test_every_resnet50_tensor_maps_to_a_flax_variable_of_its_shape():
  """The reference ResNet50(num_classes=127) state_dict (names and shapes as torch lists them): converted as zeros,
  checked against the flax ResNet-50 the converter builds, variable by variable."""
  shapes = json.loads((DATA / "resnet50_state_dict.json").read_text())
  assert len(shapes) == 324
  variables, report = convert.convert_state_dict({k: np.zeros(s, np.float32) for k, s in shapes.items()})
  assert report.architecture.describe().startswith("ResNet-50 (bottleneck blocks (3, 4, 6, 3), base width 64), "
                                                   "127 classes, feature dim 2048")
  assert report.parameter_count == 24_028_994 - 8_196  # the reference's count less the rotation head 2048 x 4 + 4
  counters = [k for k in shapes if k.endswith("num_batches_tracked")]
  assert report.converted + len(counters) + 2 == len(shapes) and report.ignored_counters == len(counters) == 53
  model = ResNet(127)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
  assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(np.shape, variables)
  flat = convert.flatten_variables(variables)
  # A few by hand: a strided shortcut's BatchNorm, a bottleneck's 3x3 kernel (OIHW -> HWIO), the balanced head.
  assert flat["batch_stats/layer3_0/shortcut_bn/var"].shape == tuple(shapes["layer3.0.shortcut.1.running_var"])
  assert flat["params/layer4_2/conv2/kernel"].shape == (3, 3, 512, 512)
  assert flat["params/layer2_0/shortcut_conv/kernel"].shape == (1, 1, 256, 512)
  assert flat["params/fc1/kernel"].shape == (2048, 127)
  assert "params/layer1_1/shortcut_conv/kernel" not in flat  # identity shortcuts have no convolution
