"""The PyTorch -> flax WideResNet converter on state_dicts built here with numpy, and its command line."""
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from semi_jax import convert
from semi_jax.models.wide_resnet import WideResNet

DATA = pathlib.Path(__file__).parent / "data"
REPO = pathlib.Path(__file__).parent.parent


def wrn_state_dict(depth=10, width=2, num_classes=10, seed=0, with_fc1=True, counters=True):
  """A state_dict with the names and shapes of the reference (FixMatch/ACR/SeMi) torch WideResNet."""
  rng = np.random.default_rng(seed)
  n = (depth - 4) // 6
  ch = [16, 16 * width, 32 * width, 64 * width]
  sd = {}

  def add_bn(name, c):
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    if counters:
      sd[f"{name}.num_batches_tracked"] = np.asarray(123, np.int64)

  def add_conv(name, c_out, c_in, k):
    sd[f"{name}.weight"] = rng.normal(0, 0.1, (c_out, c_in, k, k)).astype(np.float32)

  add_conv("conv1", 16, 3, 3)
  for stage in (1, 2, 3):
    for i in range(n):
      c_in = ch[stage - 1] if i == 0 else ch[stage]
      c_out = ch[stage]
      p = f"block{stage}.layer.{i}"
      add_bn(f"{p}.bn1", c_in)  # the torch block always has bn1, used or not
      add_conv(f"{p}.conv1", c_out, c_in, 3)
      add_bn(f"{p}.bn2", c_out)
      add_conv(f"{p}.conv2", c_out, c_out, 3)
      if c_in != c_out:
        add_conv(f"{p}.convShortcut", c_out, c_in, 1)
  add_bn("bn1", ch[3])
  for head in ("fc", "fc1") if with_fc1 else ("fc",):
    sd[f"{head}.weight"] = rng.normal(0, 0.1, (num_classes, ch[3])).astype(np.float32)
    sd[f"{head}.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return sd


def test_conv_and_dense_layouts_element_by_element():
  sd = wrn_state_dict()
  variables, _ = convert.convert_state_dict(sd)
  params = variables["params"]
  for torch_name, kernel in (("conv1.weight", params["conv1"]["kernel"]),
                             ("block1.layer.0.convShortcut.weight", params["block1_0"]["shortcut"]["kernel"]),
                             ("block2.layer.0.conv2.weight", params["block2_0"]["conv2"]["kernel"])):
    w = sd[torch_name]
    o_n, i_n, h_n, w_n = w.shape
    assert kernel.shape == (h_n, w_n, i_n, o_n)
    for o in range(o_n):
      for i in range(i_n):
        for h in range(h_n):
          for x in range(w_n):
            assert kernel[h, x, i, o] == w[o, i, h, x]
  for head in ("fc", "fc1"):
    w = sd[f"{head}.weight"]
    kernel = params[head]["kernel"]
    assert kernel.shape == (w.shape[1], w.shape[0])
    for o in range(w.shape[0]):
      for i in range(w.shape[1]):
        assert kernel[i, o] == w[o, i]
    np.testing.assert_array_equal(params[head]["bias"], sd[f"{head}.bias"])


def test_batchnorm_tensors_go_to_scale_bias_mean_var():
  sd = wrn_state_dict()
  variables, _ = convert.convert_state_dict(sd)
  for torch_name, path in (("block1.layer.0.bn1", ("block1_0", "bn1")), ("block3.layer.0.bn2", ("block3_0", "bn2")),
                           ("bn1", ("bn1",))):
    p, s = variables["params"], variables["batch_stats"]
    for part in path:
      p, s = p[part], s[part]
    np.testing.assert_array_equal(p["scale"], sd[f"{torch_name}.weight"])
    np.testing.assert_array_equal(p["bias"], sd[f"{torch_name}.bias"])
    np.testing.assert_array_equal(s["mean"], sd[f"{torch_name}.running_mean"])
    np.testing.assert_array_equal(s["var"], sd[f"{torch_name}.running_var"])


@pytest.mark.parametrize("depth,width,classes", [(10, 2, 10), (16, 1, 7), (22, 3, 4)])
def test_infers_architecture_and_fits_the_flax_model(depth, width, classes):
  variables, report = convert.convert_state_dict(wrn_state_dict(depth, width, classes))
  assert report.architecture == convert.Architecture(depth=depth, width=width, num_classes=classes)
  assert f"WideResNet-{depth}-{width}, {classes} classes" in "\n".join(report.lines())
  model = WideResNet(num_classes=classes, depth=depth, width=width)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32)))
  assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(np.shape, variables)
  logits, logits_b, feats = model.apply(variables, np.zeros((2, 8, 8, 3), np.float32))
  assert logits.shape == logits_b.shape == (2, classes) and feats.shape == (2, 64 * width)


def test_discarded_batchnorm_is_skipped_with_a_note_and_counters_are_ignored():
  sd = wrn_state_dict(depth=16)
  variables, report = convert.convert_state_dict(sd)
  skipped = "\n".join(report.skipped)
  for stage in (2, 3):
    for t in ("weight", "bias", "running_mean", "running_var"):
      assert f"block{stage}.layer.0.bn1.{t}" in skipped
    assert "bn1" not in variables["params"][f"block{stage}_0"]
    assert "bn1" in variables["params"][f"block{stage}_1"]  # later blocks of the stage use theirs
  assert "block1.layer.0.bn1" not in skipped and "discards" in skipped
  assert report.ignored_counters == sum(k.endswith("num_batches_tracked") for k in sd)


def test_module_prefix_is_stripped():
  sd = wrn_state_dict()
  plain, _ = convert.convert_state_dict(sd)
  prefixed, report = convert.convert_state_dict({f"module.{k}": v for k, v in sd.items()})
  assert report.stripped_prefix == "module."
  jax.tree.map(np.testing.assert_array_equal, plain, prefixed)


def test_wrapped_checkpoint_picks_ema_or_model():
  model_sd, ema_sd = wrn_state_dict(seed=1), wrn_state_dict(seed=2)
  ckpt = {"epoch": 10, "state_dict": model_sd, "ema_state_dict": ema_sd, "acc": 80.0, "optimizer": {"state": {}}}
  sd, source = convert.select_state_dict(ckpt)
  assert source == "ema_state_dict" and sd["fc.bias"] is not None
  np.testing.assert_array_equal(sd["fc.bias"], ema_sd["fc.bias"])
  sd, source = convert.select_state_dict(ckpt, which="model")
  assert source == "state_dict"
  np.testing.assert_array_equal(sd["fc.bias"], model_sd["fc.bias"])
  no_ema = dict(ckpt, ema_state_dict=None)
  assert convert.select_state_dict(no_ema)[1] == "state_dict"
  with pytest.raises(ValueError, match="no 'ema_state_dict'"):
    convert.select_state_dict(no_ema, which="ema")
  with pytest.raises(ValueError, match="neither a state_dict"):
    convert.select_state_dict({"model": model_sd})


def test_missing_tensor_is_an_error_naming_it():
  sd = wrn_state_dict()
  del sd["block2.layer.0.conv2.weight"]
  del sd["bn1.running_var"]
  with pytest.raises(ValueError, match=r"bn1\.running_var, block2\.layer\.0\.conv2\.weight|"
                                       r"block2\.layer\.0\.conv2\.weight, bn1\.running_var"):
    convert.convert_state_dict(sd)


def test_unexpected_tensor_is_named():
  sd = wrn_state_dict()
  sd["projection.0.weight"] = np.zeros((64, 128), np.float32)
  with pytest.raises(ValueError, match=r"does not use: projection\.0\.weight"):
    convert.convert_state_dict(sd)
  variables, report = convert.convert_state_dict(sd, allow_unexpected=True)
  assert any("projection.0.weight" in s and "unexpected" in s for s in report.skipped)
  assert "projection" not in variables["params"]


def test_fixmatch_checkpoint_gets_fc1_as_a_copy_of_fc_with_a_warning():
  sd = wrn_state_dict(with_fc1=False)
  with pytest.warns(UserWarning, match="fc1 is a copy of fc"):
    variables, report = convert.convert_state_dict(sd)
  np.testing.assert_array_equal(variables["params"]["fc1"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(variables["params"]["fc1"]["bias"], sd["fc.bias"])
  assert any("fc1" in w for w in report.warnings)
  with pytest.raises(ValueError, match="no balanced head fc1"):
    convert.convert_state_dict(sd, missing_fc1="error")
  half = wrn_state_dict()
  del half["fc1.bias"]  # one head tensor without the other is a broken checkpoint, not a FixMatch one
  with pytest.raises(ValueError, match=r"fc1\.bias"):
    convert.convert_state_dict(half)


def test_wrong_shapes_and_values_are_errors():
  sd = wrn_state_dict()
  sd["fc.weight"] = sd["fc.weight"][:, :64]
  with pytest.raises(ValueError, match=r"fc\.weight has shape \(10, 64\)"):
    convert.convert_state_dict(sd)
  sd = wrn_state_dict()
  sd["block3.layer.0.conv2.weight"] = sd["block3.layer.0.conv2.weight"][:, :, :1, :1]
  with pytest.raises(ValueError, match="block3_0/conv2/kernel"):
    convert.convert_state_dict(sd)
  sd = wrn_state_dict()
  sd["bn1.running_var"][3] = np.nan
  with pytest.raises(ValueError, match=r"bn1\.running_var.*NaN"):
    convert.convert_state_dict(sd)
  sd = wrn_state_dict()
  sd = {k: v for k, v in sd.items() if not k.startswith("block3.")}
  with pytest.raises(ValueError, match="block3"):
    convert.convert_state_dict(sd)
  with pytest.raises(ValueError, match="not a WideResNet or ResNet state_dict: 'conv1.weight' is missing"):
    convert.convert_state_dict({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="not a ResNet state_dict: 'conv1.weight' is missing"):
    convert.convert_state_dict({"layer1.0.conv1.weight": np.zeros((64, 64, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"conv1.weight has shape \(64, 3, 7, 7\); .* 7x7 ImageNet stem"):
    convert.convert_state_dict({**resnet_state_dict(), "conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})


def test_bad_files_give_clear_errors(tmp_path):
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="is empty"):
    convert.read_checkpoint(empty)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(os.urandom(256))
  with pytest.raises(ValueError, match="neither an .npz nor a zip-format PyTorch checkpoint"):
    convert.read_checkpoint(junk, reader="builtin")
  with pytest.raises(ValueError, match="cannot read checkpoint"):
    convert.read_checkpoint(tmp_path / "absent.pth")
  objects = tmp_path / "objects.npz"
  np.savez(objects, a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(ValueError, match="without pickled objects"):
    convert.read_checkpoint(objects)
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes((DATA / "tiny_checkpoint.pth").read_bytes()[:3000])
  with pytest.raises(ValueError):
    convert.read_checkpoint(truncated, reader="builtin")
  other_zip = tmp_path / "other.zip"
  with zipfile.ZipFile(other_zip, "w") as zf:
    zf.writestr("readme.txt", "hello")
  with pytest.raises(ValueError, match="neither a PyTorch checkpoint"):
    convert.read_checkpoint(other_zip, reader="builtin")


class _Payload:
  def __reduce__(self):
    return (os.system, ("echo should-not-run",))


def test_builtin_reader_refuses_pickled_code(tmp_path):
  bad = tmp_path / "bad.pth"
  with zipfile.ZipFile(bad, "w") as zf:
    zf.writestr("bad/data.pkl", pickle.dumps({"state_dict": _Payload()}, protocol=2))
  with pytest.raises(ValueError, match=r"pickles (posix|os|nt)\.system, which the built-in reader does not load"):
    convert.read_checkpoint(bad, reader="builtin")


def test_builtin_reader_on_a_file_written_by_torch():
  """tests/data/tiny_checkpoint.pth: torch.save of a wrapped checkpoint with simple known tensor values."""
  ckpt = convert.read_checkpoint(DATA / "tiny_checkpoint.pth", reader="builtin")
  assert ckpt["epoch"] == 3 and ckpt["acc"] == 12.5 and ckpt["scheduler"]["lr_lambdas"] == [None]
  sd = ckpt["state_dict"]
  conv = np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3) / 8
  np.testing.assert_array_equal(sd["module.0.weight"], conv)
  np.testing.assert_array_equal(sd["module.1.running_var"], np.array([2.0, 0.5], np.float32))
  assert sd["module.1.num_batches_tracked"].dtype == np.int64 and sd["module.1.num_batches_tracked"] == 7
  np.testing.assert_array_equal(ckpt["ema_state_dict"]["0.weight"], 2 * conv)
  linear = np.arange(12, dtype=np.float32).reshape(3, 4) / 4 - 1
  np.testing.assert_array_equal(ckpt["ema_state_dict"]["2.weight"], 2 * linear)
  base = np.arange(12, dtype=np.float64).reshape(3, 4)
  extra = ckpt["extra"]
  np.testing.assert_array_equal(extra["transposed"], base.T)  # a strided view of its storage
  np.testing.assert_array_equal(extra["rows"], base[1:])  # an offset into a shared storage
  assert extra["half"].dtype == np.float16 and extra["half"].tolist() == [0.5, -2.0]
  assert extra["bf16"].astype(np.float32).tolist() == [1.5, -3.0]
  assert extra["flags"].tolist() == [True, False] and extra["ints"].tolist() == [-2, -1, 0, 1, 2]
  assert extra["scalar"].shape == () and extra["scalar"] == 3.25 and extra["empty"].shape == (0, 3)
  assert ckpt["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3, 3, 3)
  np.testing.assert_allclose(ckpt["u_py"], np.full(3, 1 / 3))
  state, source = convert.select_state_dict(ckpt, which="model")
  stripped, prefix = convert.strip_wrapper_prefix(state)
  assert source == "state_dict" and prefix == "module." and "0.weight" in stripped


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "semi_jax.convert", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_round_trip_on_an_npz(tmp_path):
  sd = wrn_state_dict(depth=10, width=2, num_classes=10, seed=5)
  src = tmp_path / "wrn.npz"
  np.savez(src, **{f"module.{k}": v for k, v in sd.items()})
  out = tmp_path / "flax_vars.npz"
  result = _run_cli(src, out)
  assert result.returncode == 0, result.stderr
  assert "WideResNet-10-2, 10 classes, feature dim 128" in result.stdout
  assert "block2.layer.0.bn1.weight" in result.stdout and "'module.' stripped" in result.stdout
  with np.load(out) as flat:
    assert all(k.startswith(("params/", "batch_stats/")) for k in flat.files)
    assert "params/block1_0/conv1/kernel" in flat.files and "batch_stats/bn1/var" in flat.files
  loaded = convert.load_variables(out)
  expected, _ = convert.convert_state_dict(sd)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)

  del sd["fc1.weight"], sd["fc1.bias"], sd["bn1.bias"]
  np.savez(src, **sd)
  result = _run_cli(src, tmp_path / "never.npz")
  assert result.returncode == 1 and "bn1.bias" in result.stderr
  assert not (tmp_path / "never.npz").exists()


def test_load_variables_rejects_other_files(tmp_path):
  other = tmp_path / "other.npz"
  np.savez(other, **{"conv1.weight": np.zeros((16, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="not an .npz of flax variables"):
    convert.load_variables(other)
  text = tmp_path / "vars.txt"
  text.write_text("params")
  with pytest.raises(ValueError, match="not an .npz of flax variables"):
    convert.load_variables(text)


def resnet_state_dict(blocks=(1, 2, 1, 1), block="bottleneck", base=4, num_classes=5, seed=0, rotation=True):
  """A state_dict with the names and shapes of the reference's CIFAR-style torch ResNet (layerS.I.*, shortcut.0/1)."""
  rng = np.random.default_rng(seed)
  expansion = 4 if block == "bottleneck" else 1
  sd = {}

  def add_bn(name, c):
    for tensor in ("weight", "bias", "running_mean", "running_var"):
      sd[f"{name}.{tensor}"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.num_batches_tracked"] = np.asarray(9, np.int64)

  def add_conv(name, c_out, c_in, k):
    sd[f"{name}.weight"] = rng.normal(0, 0.1, (c_out, c_in, k, k)).astype(np.float32)

  add_conv("conv1", base, 3, 3)
  add_bn("bn1", base)
  c_in = base
  for stage, count in enumerate(blocks, start=1):
    w = base * 2 ** (stage - 1)
    for i in range(count):
      p = f"layer{stage}.{i}"
      convs = [(w, c_in, 1), (w, w, 3), (w * 4, w, 1)] if block == "bottleneck" else [(w, c_in, 3), (w, w, 3)]
      for j, (co, ci, k) in enumerate(convs, start=1):
        add_conv(f"{p}.conv{j}", co, ci, k)
        add_bn(f"{p}.bn{j}", co)
      if (stage > 1 and i == 0) or c_in != w * expansion:
        add_conv(f"{p}.shortcut.0", w * expansion, c_in, 1)
        add_bn(f"{p}.shortcut.1", w * expansion)
      c_in = w * expansion
  for head in ("fc", "fc1") + (("rot",) if rotation else ()):
    sd[f"{head}.weight"] = rng.normal(0, 0.1, (4 if head == "rot" else num_classes, c_in)).astype(np.float32)
    sd[f"{head}.bias"] = rng.normal(0, 0.1, 4 if head == "rot" else num_classes).astype(np.float32)
  return sd


@pytest.mark.parametrize("blocks,block,rotation", [((1, 2, 1, 1), "bottleneck", True), ((2, 1, 1, 2), "basic", False)])
def test_resnet_state_dicts_are_recognised_and_laid_out(blocks, block, rotation):
  sd = resnet_state_dict(blocks, block, rotation=rotation)
  variables, report = convert.convert_state_dict({f"module.{k}": v for k, v in sd.items()})
  assert report.architecture == convert.ResNetArchitecture(blocks=blocks, block=block, base_width=4, num_classes=5)
  assert report.stripped_prefix == "module." and bool(report.skipped) == rotation
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["layer2_0"]["shortcut_conv"]["kernel"],
                                sd["layer2.0.shortcut.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["layer2_0"]["shortcut_bn"]["var"], sd["layer2.0.shortcut.1.running_var"])
  np.testing.assert_array_equal(params["layer1_0"]["conv2"]["kernel"],
                                sd["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["fc1"]["kernel"], sd["fc1.weight"].T)
  logits, logits_b, feats = jax.eval_shape(report.architecture.model().apply, variables,
                                           np.ones((2, 8, 8, 3), np.float32))
  assert logits.shape == logits_b.shape == (2, 5) and feats.shape == (2, report.architecture.feature_dim)


def test_a_resnet_missing_a_shortcut_batchnorm_is_named():
  sd = resnet_state_dict()
  del sd["layer3.0.shortcut.1.running_var"]
  with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) .*ResNet .*layer3.0.shortcut.1.running_var"):
    convert.convert_state_dict(sd)
  sd = resnet_state_dict()
  sd["layer3.0.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="layer3.0.extra.weight"):
    convert.convert_state_dict(sd)
