"""The paper configurations lower for TPU and GPU (jax.export, 8-device data axis) without anything CPU-only.

`semi_jax.tools.export_check` builds the run's programs exactly as `semi_jax.train` does for each platform (a
GPU's step makes the views, a TPU's reads them) and exports them, a run alone's and that of runs trained
together: a primitive without a lowering for the platform, a custom call without a stability guarantee (host
callbacks, XLA:CPU kernels), the CPU fast paths on an accelerator or an unsharded input fails the check. The
negative tests show that each of those failures is caught.
"""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowered import conv_kinds

from semi_jax import config_files, objective, sharding, together
from semi_jax import program as program_lib
from semi_jax.tools import export_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return sharding.make_mesh()


def _config(spec, dtype):
  config = config_files.load(os.path.join(ROOT, "configs", spec))
  config.model.dtype = dtype
  return config


# ImageNet-127 with ResNet-50 at 64x64 in bfloat16 only, the setting it runs in: each ResNet-50 export takes about
# 8 s on 2 CPU cores, and the float32 program differs only in its dtypes (WRN-28-2 covers both).
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("spec, dtype, model", [
    ("cifar10_lt.py", "float32", ("wide_resnet", 28, 2)), ("cifar10_lt.py", "bfloat16", ("wide_resnet", 28, 2)),
    ("imagenet127.py:size=64", "bfloat16", ("resnet", (3, 4, 6, 3), "bottleneck"))])
def test_paper_configs_lower_for_tpu_and_cuda(mesh, spec, dtype, model, platform):
  config = _config(spec, dtype)
  m, t = config.model, config.train
  built = (m.name, m.depth, m.width) if m.name == "wide_resnet" else (m.name, tuple(m.blocks), m.block)
  assert built == model and config.cpu_fast_paths == "auto" and config.data.augment_on == "auto"
  results = export_check.lower(config, mesh, (platform,))
  assert [r.name for r in results] == ["train_step", "eval_step"]
  for r in results:
    assert r.problems == [], (r.name, r.problems)
    assert r.exported.platforms == (platform,) and r.exported.nr_devices == 8
    assert r.batch_inputs_sharded == r.batch_inputs >= 3  # images, y, u_label / image, label, mask
    assert all(not any(p in t.lower() for p in export_check.CPU_ONLY_TARGETS) for t in r.custom_calls)
  module = results[0].exported.mlir_module()
  size = 64 if "size=64" in spec else 32
  b, u = t.batch_size, t.batch_size * t.mu
  # A GPU's step makes the views from the labeled and unlabeled source images (data.augment_on=auto); a TPU's
  # reads the weak, strong and second strong views the host made.
  rows = b + u if platform == "cuda" else b + 3 * u
  assert f"tensor<{rows}x{size}x{size}x3xui8>" in module
  assert ("loc(\"batch['positions']\")" in module) == (platform == "cuda")  # the source images' positions
  assert "tf.aliasing_output" in module  # state and carry donated: updated in place on the accelerator
  if m.name == "resnet":  # ResNet-50's features fill the bank: [127 classes, 128 entries, 2048]
    assert "tensor<127x128x2048xf32>" in module and "tensor<7x7x" not in module
  if dtype == "bfloat16":  # the convolutions compute in bfloat16
    assert re.search(r"stablehlo\.convolution.*tensor<[0-9x]+xbf16>", module)


def test_platforms_that_run_different_programs_are_lowered_one_at_a_time(mesh):
  """A GPU's step makes the views, a TPU's does not: one export for both would give the GPU the TPU's program."""
  with pytest.raises(ValueError, match=r"augment_on='auto' makes the views in the step on \['cuda'\] only"):
    export_check.lower(_config("test.py", "float32"), mesh, ("tpu", "cuda"))
  config = _config("test.py", "float32")
  config.data.augment_on = "host"  # now both run one program
  assert export_check.programs_differ(config, ("tpu", "cuda")) is None
  assert "together.conv" in export_check.programs_differ(config, ("cpu", "cuda"), runs=3)  # per_run vs grouped


@pytest.mark.parametrize("platform, conv", [("cuda", "grouped"), ("cuda", "per_run"), ("tpu", "auto")])
def test_the_stacked_program_lowers_for_each_platform(platform, conv):
  """The program of 3 WRN-28-2 runs trained together, in the mesh the sweep picks on 8 devices of the platform,
  with every traceable field traced: state split over the run axis, batches over the data axis, and the
  convolutions batched as together.conv says (per_run: only ordinary ones, as a run alone has)."""
  config = _config("cifar10_lt.py", "float32")
  config.together.conv = conv
  stacked = export_check.stacked_mesh(config, jax.devices(), 3, platform)
  if platform == "cuda":
    # GPUs: the fewest runs per device first (docs/performance.md), then the least work per device
    assert dict(stacked.shape) == {"run": 4, "data": 2}
  results = export_check.lower(config, stacked, (platform,), runs=together.padded_runs(3, stacked))
  for r in results:
    assert r.problems == [], (r.name, r.problems)
    assert r.exported.platforms == (platform,) and r.exported.nr_devices == 8
    assert r.batch_inputs_sharded == r.batch_inputs >= 3
  assert [r.conv for r in results] == [program_lib.conv_formulation(conv, {platform})] * 2
  runs = together.padded_runs(3, stacked)
  module = results[0].exported.mlir_module()
  assert f"tensor<{runs}x3x3x3x16xf32>" in module  # the first convolution's kernel (3 -> 16), per run
  kinds = conv_kinds(module)
  grouped = sum(n for (kind, _), n in kinds.items() if kind != "ordinary")
  if results[0].conv == "per_run":  # each device loops over its runs with a run alone's convolutions
    assert grouped == 0 and kinds[("ordinary", "small window")] > 0, kinds
  else:
    assert kinds[("batch-grouped", "whole input")] == 28 and kinds[("feature-grouped", "whole input")] == 0, kinds


def test_the_cpu_fast_paths_on_an_accelerator_are_reported(mesh):
  config = _config("test.py", "float32")
  config.cpu_fast_paths = "on"
  problems = [p for r in export_check.lower(config, mesh, ("tpu",)) for p in r.problems]
  assert any("CPU fast paths are on" in p for p in problems), problems


def test_a_host_callback_in_the_step_fails_the_lowering(mesh, monkeypatch):
  real = objective.unlabeled_loss

  def with_callback(*args):
    loss = real(*args)
    return jax.pure_callback(lambda x: np.asarray(x), jax.ShapeDtypeStruct((), jnp.float32), loss)

  monkeypatch.setattr(objective, "unlabeled_loss", with_callback)
  with pytest.raises(Exception, match="callback"):
    export_check.lower(_config("test.py", "float32"), mesh, ("cuda",))


@pytest.mark.parametrize("setting, code", [("auto", 0), ("on", 1)])
def test_the_command_checks_a_config_from_another_directory(tmp_path, setting, code):
  """A fresh process simulating 2 devices, as a user runs it before booking a pod; exit status 1 on a problem."""
  r = subprocess.run([sys.executable, "-m", "semi_jax.tools.export_check",
                      f"--config={os.path.join(ROOT, 'configs', 'test.py')}:algo=acr", "--devices=2",
                      "--dtypes=bfloat16", "--platforms=tpu", "--runs=3", "--conv=grouped,per_run",
                      f"--config.cpu_fast_paths={setting}"],
                     cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
  assert r.returncode == code, r.stdout + r.stderr[-3000:]
  assert "train_step  bfloat16  tpu   2 devices, alone" in r.stdout, r.stdout
  for conv in ("grouped", "per_run"):  # 3 runs over 2 devices: the run axis takes both, padded to 4 runs
    assert f"train_step  bfloat16  tpu   2 devices, 3 runs on run 2 x data 1, conv {conv}" in r.stdout, r.stdout
  assert ("all programs lowered" in r.stdout) == (code == 0)


@pytest.mark.parametrize("args, expected", [([], ("float32", "bfloat16")),
                                            (["--config.model.dtype=bfloat16"], ("bfloat16",)),
                                            (["--config.model.dtype=bfloat16", "--dtypes=float32"], ("float32",))])
def test_the_dtype_override_chooses_what_is_lowered(args, expected):
  """The documented `--config.model.dtype=bfloat16` lowers bfloat16 only, unless --dtypes says otherwise."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'test.py')}", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_list("dtypes", [], "", flag_values=flag_values)
  flag_values(argv)
  assert export_check.dtypes_to_lower(flag_values) == expected
