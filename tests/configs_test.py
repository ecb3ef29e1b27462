import glob
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags
from absl import flags

from configs import default
from configs import test as test_config
from semi_jax import config_validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith("__init__.py")]


def _load(path_with_arg):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(["prog", f"--config={path_with_arg}"])
  return fv.config


def _keys(d, prefix=""):
  out = set()
  for k, v in d.items():
    out.add(prefix + k)
    if isinstance(v, dict):
      out |= _keys(v, prefix + k + ".")
  return out


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_loads_locks_validates_and_has_default_keys(path):
  config = _load(path)
  assert _keys(config.to_dict()) == _keys(default.get_config().to_dict())
  config_validation.validate(config)
  with pytest.raises(AttributeError):
    config.data.not_a_field = 1


def _main(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "semi_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_unknown_key_and_bad_argument_fail_in_one_clear_line(tmp_path):
  r = _main("--config=configs/test.py", "--config.data.lable_max=3", f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "bad configuration" in r.stderr and "labeled_max" in r.stderr and "Traceback" not in r.stderr
  r = _main("--config=configs/test.py:algo=fixmach", f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "unknown algorithm 'fixmach'" in r.stderr and "Traceback" not in r.stderr


def test_cli_invalid_value_names_the_field(tmp_path):
  r = _main("--config=configs/test.py", "--config.ssl.threshold.value=1.5", f"--workdir={tmp_path}")
  assert r.returncode != 0 and "ssl.threshold" in r.stderr and "Traceback" not in r.stderr


def test_override_and_arguments():
  c = default.get_config("algo=acr,dist=reversed,cons=on")
  assert c.data.unlabeled_dist == "reversed"
  # ACR plus Lcons is no preset: the run is labelled custom, never acr.
  assert c.ssl.algo == "custom" and c.ssl.dual_head and not c.miner.enabled and not c.bank.enabled
  assert c.cons.enabled
  assert default.get_config("algo=acr,cons=off").ssl.algo == "acr"  # switched to what the preset has anyway


def test_algo_must_match_its_switches():
  """--config.ssl.algo=fixmatch on a SeMi config would train SeMi labelled FixMatch: refused, naming every
  switch that differs; `custom` takes any switches; the preset argument sets them all."""
  c = test_config.get_config()
  c.ssl.algo = "fixmatch"
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(c)
  message = str(err.value)
  for field in ("ssl.dual_head=True", "miner.enabled=True", "bank.enabled=True", "plce.enabled=True",
                "cons.enabled=True"):
    assert field + " (preset: False)" in message, message
  assert "algo=fixmatch sets every switch" in message and "ssl.algo=custom" in message
  c.ssl.algo = "custom"
  config_validation.validate(c)
  r = _main("--config=configs/test.py", "--config.ssl.algo=acr", "--workdir=/nonexistent/never-created")
  assert r.returncode != 0 and "ssl.algo='acr' does not match" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("algo,dual,la,components", [
    ("fixmatch", False, False, False), ("fixmatch_la", False, True, False), ("acr", True, False, False),
    ("semi", True, False, True)])
def test_algorithm_presets(algo, dual, la, components):
  c = default.get_config(f"algo={algo}")
  assert c.ssl.dual_head == dual and c.ssl.labeled_logit_adjust == la
  assert all(c[name].enabled == components for name in default.COMPONENTS)


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="unknown algorithm 'fixmach'"):
    default.get_config("algo=fixmach")
  with pytest.raises(ValueError, match="unknown config argument 'mienr'"):
    default.get_config("mienr=off")
  with pytest.raises(ValueError, match="use on or off"):
    default.get_config("miner=maybe")
  with pytest.raises(Exception, match="size must be 32 or 64"):
    _load(f"{ROOT}/configs/imagenet127.py:size=48")


def test_imagenet_size_argument():
  c = _load(f"{ROOT}/configs/imagenet127.py:size=64,algo=acr")
  assert c.data.name == "imagenet127_64" and c.data.image_size == 64 and c.ssl.algo == "acr"
  # ResNet-50 as in the paper, with torch's default BatchNorm momentum 0.1
  assert (c.model.name, tuple(c.model.blocks), c.model.block, c.model.base_width) == (
      "resnet", (3, 4, 6, 3), "bottleneck", 64)
  assert c.model.bn_momentum == 0.9
  config_validation.validate(c)


def test_cli_missing_data_set_is_one_clear_line(tmp_path):
  r = _main("--config=configs/cifar10_lt.py", f"--config.data.data_dir={tmp_path}/tfds",
            f"--workdir={tmp_path}/run")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "cifar10" in r.stderr and f"{tmp_path}/tfds" in r.stderr
  assert "semi_jax.tools.prepare_data --dataset=cifar10" in r.stderr
  assert not os.path.exists(f"{tmp_path}/run/config.json")  # a failed start leaves nothing that binds the next
