"""Short runs of every config file: `:steps=N` and `--config.train.total_steps=N` scale the fields tied to the run
length (one rule, semi_jax.config_files.length_tied_values), keep what the user set, and a 60-step run trains."""
from __future__ import annotations

import glob
import os

from absl import flags
from ml_collections import config_flags
import pytest

from semi_jax import config_files, config_validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith("__init__.py")]
DIGITS = os.path.join(ROOT, "configs", "digits_lt.py")
CIFAR10 = os.path.join(ROOT, "configs", "cifar10_lt.py")


def _command_line(spec: str, *overrides: str):
  """The config as semi_jax.main gets it: the file (locked) with --config.* flags, then `fit_to_length` with the
  flags' fields as the explicit ones; returns (config, notes)."""
  argv = ["prog", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  notes = config_files.fit_to_length(fv.config, fv["config"].config_filename,
                                     explicit=fv["config"].override_values)
  return fv.config, notes


def _with_arg(path: str, arg: str) -> str:
  return f"{path}:{arg}"


def _check_runnable(config, steps: int) -> None:
  """Valid, and the SeMi components start within the run (they run from epoch ssl.est_epoch + 1 on)."""
  t = config.train
  assert t.total_steps == steps
  config_validation.validate(config)
  assert 1 <= t.steps_per_epoch <= steps
  assert config.ssl.est_epoch < (steps - 1) // t.steps_per_epoch, (config.ssl.est_epoch, t.steps_per_epoch)
  assert 1.0 <= config.bank.decay_every.value <= max(t.steps_per_epoch, 2.0)
  assert not config_validation.start_up_warnings(config)


@pytest.mark.parametrize("steps", [50, 100])
@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_runs_short_with_the_steps_argument_and_the_flag(path, steps):
  by_arg, _ = _command_line(_with_arg(path, f"steps={steps}"))
  _check_runnable(by_arg, steps)
  by_flag, _ = _command_line(path, f"--config.train.total_steps={steps}")
  _check_runnable(by_flag, steps)
  # One rule: both paths give the same configuration.
  assert by_flag.to_dict() == by_arg.to_dict()


def test_digits_lt_at_100_steps_by_hand():
  """configs/digits_lt.py trains 1,000 steps in 20 epochs of 50, warm-up ssl.est_epoch=2, bank decay every 25 steps
  (epoch clock: after steps 24 and 49 of every epoch, twice an epoch). At 100 steps:
    steps_per_epoch = floor(50 * 100 / 1000) = 5      -> still 20 epochs; the SeMi parts start at step 3 * 5 = 15
    ssl.est_epoch   = 2                               -> kept: 2 < the last epoch index (100 - 1) // 5 = 19
    decay_every     = floor(25 * 5 / 50) = floor(2.5) = 2 -> after steps 1 and 3 of every 5-step epoch: twice an
                                                         epoch, as in the file
  configs/cifar10_lt.py (250,000 steps, 500 epochs of 500, est_epoch 2, decay every 100) cannot keep 500 epochs in
  100 steps: steps_per_epoch = max(1, floor(500 * 100 / 250000) = 0) = 1 (100 epochs), est_epoch 2 kept (SeMi from
  step 3), decay_every = max(1, floor(100 * 1 / 500) = 0) = 1."""
  config, notes = _command_line(DIGITS, "--config.train.total_steps=100")
  assert (config.train.steps_per_epoch, config.ssl.est_epoch, config.bank.decay_every.value) == (5, 2, 2.0)
  assert (config.train.log_every_steps, config.train.eval_every_steps) == (50, 200)  # the loop evaluates at the end
  assert any(n.startswith("train.steps_per_epoch: 50 -> 5 ") for n in notes), notes
  assert any(n.startswith("bank.decay_every.value: 25.0 -> 2.0 ") for n in notes), notes
  config, _ = _command_line(_with_arg(CIFAR10, "steps=100"))
  assert (config.train.steps_per_epoch, config.ssl.est_epoch, config.bank.decay_every.value) == (1, 2, 1.0)
  # The full-length file is untouched: nothing to fit, nothing to say.
  config, notes = _command_line(DIGITS)
  assert (config.train.steps_per_epoch, config.bank.decay_every.value, notes) == (50, 25.0, [])


def test_a_longer_run_keeps_the_file_values():
  """Every value of the file fits a longer run; the reference's epoch length stays fixed (as its eval_step)."""
  config, notes = _command_line(_with_arg(DIGITS, "steps=3000"))
  assert (config.train.steps_per_epoch, config.ssl.est_epoch, config.bank.decay_every.value, notes) == (
      50, 2, 25.0, [])
  # steps= shortened, the flag lengthened again: the file's own values come back.
  config, _ = _command_line(_with_arg(DIGITS, "steps=100"), "--config.train.total_steps=2000")
  assert (config.train.steps_per_epoch, config.bank.decay_every.value) == (50, 25.0)


def test_fields_set_by_the_user_stay_as_set():
  config, _ = _command_line(DIGITS, "--config.train.total_steps=100", "--config.train.steps_per_epoch=10")
  # Kept at 10; the decay interval follows it: floor(25 * 10 / 50) = 5, half an epoch as in the file.
  assert (config.train.steps_per_epoch, config.bank.decay_every.value) == (10, 5.0)
  config_validation.validate(config)
  same, _ = _command_line(_with_arg(DIGITS, "steps=100"), "--config.train.steps_per_epoch=10")
  assert same.to_dict() == config.to_dict()
  config, _ = _command_line(DIGITS, "--config.train.total_steps=100", "--config.bank.decay_every.value=7",
                            "--config.ssl.est_epoch=1")
  assert (config.train.steps_per_epoch, config.bank.decay_every.value, config.ssl.est_epoch) == (5, 7.0, 1)
  # Set to the file's own value, but on the command line: still kept. The warm-up, not set, is fitted to the two
  # epochs left: the SeMi parts run in the second one.
  config, notes = _command_line(DIGITS, "--config.train.total_steps=100", "--config.train.steps_per_epoch=50")
  assert (config.train.steps_per_epoch, config.ssl.est_epoch, config.bank.decay_every.value) == (50, 0, 25.0)
  assert any(n.startswith("ssl.est_epoch: 2 -> 0 ") for n in notes), notes
  config_validation.validate(config)
  # A warm-up set too long for the run is kept too, and validation names the fields that fix it.
  config, _ = _command_line(DIGITS, "--config.train.total_steps=100", "--config.train.steps_per_epoch=50",
                            "--config.ssl.est_epoch=2")
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(config)
  assert str(err.value) == (
      "config field ssl.est_epoch=2 is invalid: must be in [0, 2): training has 2 epochs of 50 steps "
      "(train.total_steps=100, train.steps_per_epoch=50) and the SeMi components start after epoch ssl.est_epoch; "
      "lower ssl.est_epoch, or raise train.total_steps or lower train.steps_per_epoch.")


def test_schedule_windows_and_the_warm_up_scale_with_the_run():
  """Windows given in steps keep their share of the run (steps 0, 'until the end', stays 0); a reference_cosine
  warm-up stays below its horizon; a field the user set is kept, and validation says which one to fix."""
  base = config_files.load(DIGITS)
  base.plce.ramp.update(start_step=100, steps=800)
  base.optim.lr_schedule.update(warmup_steps=50)
  base.bank.beta.update(kind="step", value=0.99, rate=0.5, every=250, start_step=500)
  base.ssl.threshold.update(kind="cosine", value=0.95, end_value=0.7, warmup_steps=999, warmup_value=0.5)
  config = base.copy_and_resolve_references()
  config.train.total_steps = 100
  notes = config_files.fit_lengths(config, base)
  assert (config.plce.ramp.start_step, config.plce.ramp.steps) == (10, 80)
  assert config.optim.lr_schedule.warmup_steps == 5
  assert (config.bank.beta.every, config.bank.beta.start_step) == (25, 50)
  assert (config.ssl.threshold.warmup_steps, config.ssl.threshold.steps) == (99, 0)
  assert len(notes) == 8, notes  # steps_per_epoch, decay_every and the six window keys above
  config_validation.validate(config)
  config = base.copy_and_resolve_references()
  config.train.total_steps = 100
  config_files.fit_lengths(config, base, keep={"optim.lr_schedule.warmup_steps"})
  assert config.optim.lr_schedule.warmup_steps == 50
  config.optim.lr_schedule.warmup_steps = 200
  with pytest.raises(config_validation.ConfigError, match=r"optim.lr_schedule.warmup_steps = 200 exceeds "
                                                          r"train.total_steps = 100.*raise train.total_steps"):
    config_validation.validate(config)


def test_a_warm_up_longer_than_the_run_is_shortened():
  """At 2 steps cifar100_lt (warm-up 20 of 500 epochs) keeps one epoch of warm-up share: est_epoch 0."""
  config, notes = _command_line(_with_arg(os.path.join(ROOT, "configs", "cifar100_lt.py"), "steps=2"))
  assert (config.train.steps_per_epoch, config.ssl.est_epoch) == (1, 0)
  assert any(n.startswith("ssl.est_epoch: 20 -> 0 ") for n in notes), notes
  config_validation.validate(config)


@pytest.mark.parametrize("sweep_file", ["decay.py", "components.py"])
def test_sweeps_plan_short(sweep_file, tmp_path):
  from semi_jax import sweep
  spec = os.path.join(ROOT, "configs", "ablations", f"{sweep_file}:steps=100")
  runs = sweep.plan(spec, str(tmp_path), seeds=[0])
  for run in runs:
    explicit = sweep.flatten_overrides(run.overrides)
    config = run.config.copy_and_resolve_references()
    config_files.fit_to_length(config, spec, explicit=explicit)  # nothing left to fit
    assert config.to_dict() == run.config.to_dict(), run.variant
    assert run.config.train.steps_per_epoch == 5 and run.config.ssl.est_epoch < 19


def test_a_60_step_run_of_digits_lt_trains_to_the_end(tmp_path):
  from semi_jax import train
  config = config_files.load(_with_arg(DIGITS, "steps=60"))
  assert (config.train.steps_per_epoch, config.bank.decay_every.value) == (3, 1.0)
  config.train.print_table = False
  config.mesh.data_axis_size = 1  # the suite fakes 8 CPU devices; digits_lt's batches are sized for one
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["step"] == 60
