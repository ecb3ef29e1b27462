"""A schedule whose kind changes over training but whose parameters keep it constant over the run is reported at
start-up, naming the field, the kind and the parameter to set; the shipped configs and sweeps are quiet."""
from __future__ import annotations

import glob
import logging
import os

import pytest

from configs import test as test_config
from semi_jax import config_files, config_validation, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith("__init__.py")]


def _warnings(config, caplog) -> list[str]:
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    config_validation.validate(config)
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_the_readme_override_alone_is_reported(caplog):
  """--config.bank.beta.kind=exponential leaves rate=1.0: the run would train the constant beta."""
  config = config_files.load(os.path.join(ROOT, "configs", "digits_lt.py"))
  config.bank.beta.kind = "exponential"
  assert _warnings(config, caplog) == [
      "bank.beta: kind=exponential with rate=1.0 is constant; set --config.bank.beta.rate (e.g. 0.5) and "
      "--config.bank.beta.every"]
  config.bank.beta.rate, config.bank.beta.every = 0.5, 100
  assert _warnings(config, caplog) == []


@pytest.mark.parametrize("field,fields,words", [
    ("ssl.threshold", {"kind": "linear", "value": 0.9, "end_value": 0.9},
     "ssl.threshold: kind=linear with end_value=0.9 equal to value=0.9 is constant; set "
     "--config.ssl.threshold.end_value"),
    ("miner.scale", {"kind": "cosine", "value": 0.5, "end_value": 0.75, "start_step": 2, "steps": 5},
     "miner.scale: kind=cosine starts changing after start_step=2, but the run's last step is 2 "
     "(train.total_steps=3), so it is constant; lower --config.miner.scale.start_step"),
    ("bank.beta", {"kind": "step", "value": 0.99, "rate": 0.5, "every": 3},
     "bank.beta: kind=step first changes at step start_step + every = 3, after the run's last step 2 "
     "(train.total_steps=3), so it is constant; lower --config.bank.beta.every"),
    ("bank.beta", {"kind": "exponential", "value": 0.0, "rate": 0.5},
     "bank.beta: kind=exponential with value=0.0 is 0 at every step; set --config.bank.beta.value"),
    ("plce.ramp", {"kind": "reference_ramp", "value": 1.0},
     "plce.ramp: kind=reference_ramp is value * (step // train.steps_per_epoch) / train.steps_per_epoch, 0 at every "
     "step of a run of train.total_steps=3 with train.steps_per_epoch=3; lower train.steps_per_epoch"),
])
def test_a_constant_schedule_of_a_changing_kind_is_named(field, fields, words, caplog):
  config = test_config.get_config()  # 3 steps
  group, name = field.split(".")
  config[group][name].update(fields)
  if fields["kind"] == "reference_ramp":
    config.train.steps_per_epoch = 3  # one epoch: the SeMi parts never start either, which is said too
  lines = _warnings(config, caplog)
  assert [line for line in lines if line.startswith(words)] == lines[-1:], lines
  assert all(line.startswith("ssl.est_epoch=0:") for line in lines[:-1]), lines


def test_a_disabled_component_and_a_one_step_run_are_quiet(caplog):
  config = test_config.get_config("algo=acr")  # no bank: its schedules are not read
  config.bank.beta.kind = "exponential"
  assert _warnings(config, caplog) == []
  config = test_config.get_config()
  config.train.total_steps = 1
  config.bank.beta.kind = "exponential"
  lines = _warnings(config, caplog)
  assert not any("bank.beta" in line for line in lines), lines


def test_components_that_never_start_are_named(caplog):
  config = test_config.get_config()  # 3 epochs of 1 step: the last epoch is 2
  config.ssl.est_epoch = 2
  assert _warnings(config, caplog) == [
      "ssl.est_epoch=2: miner, plce, cons start after epoch ssl.est_epoch, but the run's last epoch is 2 (epochs of "
      "train.steps_per_epoch=1 steps, train.total_steps=3), so they never run; lower ssl.est_epoch below 2, or "
      "raise train.total_steps or lower train.steps_per_epoch"]


@pytest.mark.parametrize("arg", ["", ":steps=50"])
@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_is_quiet(path, arg, caplog):
  assert _warnings(config_files.load(path + arg), caplog) == []


@pytest.mark.parametrize("arg", ["", ":base=test", ":base=cifar10_lt", ":steps=100"])
@pytest.mark.parametrize("sweep_file", ["decay.py", "components.py"])
def test_every_sweep_variant_is_quiet(sweep_file, arg, tmp_path, caplog):
  spec = os.path.join(ROOT, "configs", "ablations", sweep_file + arg)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    runs = sweep.plan(spec, str(tmp_path))
  assert runs and not [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
