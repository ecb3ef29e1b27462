"""Every invalid config value is rejected with a message naming the field, the value and the allowed range."""
import logging

import pytest

from configs import test as test_config
from semi_jax import config_validation


def _set(config, dotted: str, value):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


CASES = [
    # (field, value, words the message must contain)
    ("seed", -1, ">= 0"),
    ("data.image_size", 4, ">= 8"),
    ("data.labeled_imb", 0.5, "gamma must be >= 1"),
    ("data.unlabeled_imb", 0.9, "gamma must be >= 1"),
    ("data.labeled_imb", 1000.0, "tail class gets int("),  # the test config's labeled_max is below 1000
    ("data.unlabeled_dist", "skewed", "choose one of"),
    ("data.labeled_fraction", 1.0, "[0, 1)"),
    ("data.randaugment_ops", 15, "[0, 14]"),
    ("data.cutout_fraction", 1.5, "[0, 1]"),
    ("data.prefetch", -1, ">= 0"),
    ("model.depth", 12, "6n+4"),
    ("model.dropout", 1.0, "[0, 1)"),
    ("model.name", "vit", "choose one of"),
    ("model.dtype", "float16", "choose one of"),
    ("train.batch_size", 0, ">= 1"),
    ("train.mu", 0, ">= 1"),
    ("train.total_steps", 0, ">= 1"),
    ("train.checkpoint_every_steps", 0, ">= 1"),
    ("optim.lr", 0.0, "> 0"),
    ("optim.momentum", 1.0, "[0, 1)"),
    ("optim.ema_decay", 1.0, "[0, 1)"),
    ("ssl.algo", "mixmatch", "choose one of"),
    ("ssl.temperature", 0.0, "> 0"),
    ("ssl.tau1", -1.0, ">= 0"),
    ("ssl.est_epoch", 3, "must be in [0, 3)"),  # the test config trains 3 epochs of 1 step
    ("ssl.threshold.value", 1.5, "leaves [0.0, 1.0]"),
    ("ssl.threshold.value", -0.1, "leaves [0.0, 1.0]"),
    ("miner.mode", "loss", "choose one of"),
    ("miner.hard_fraction", 0.0, "(0, 1]"),
    ("bank.size", 0, "K entries per class must be >= 1"),
    ("bank.dtype", "float16", "choose one of ('float32', 'bfloat16')"),
    ("bank.beta.value", 1.2, "leaves [0.0, 1.0]"),
    ("plce.alpha", 2.0, "[0, 1]"),
    ("plce.class_weight", "inverse", "choose one of"),
    ("cons.center_momentum", 1.0, "[0, 1)"),
    ("mesh.data_axis_size", 0, "-1 (all devices) or >= 1"),
    ("eval.few_threshold", 50, "<= eval.many_threshold"),
]


@pytest.mark.parametrize("field,value,words", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_invalid_value_is_named_in_the_message(field, value, words):
  config = test_config.get_config()
  config_validation.validate(config)  # the base config is valid
  _set(config, field, value)
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(config)
  message = str(err.value)
  if field.endswith(".value"):  # a schedule: the message names the schedule field and the offending value
    assert f"config field {field.rsplit('.', 1)[0]} (" in message and f"value {value:.4g}" in message, message
  else:
    assert f"config field {field}={value!r} is invalid" in message, message
  assert words in message, message


RESNET_CASES = [
    ("model.blocks", (3, 4, 6), "4 residual-block counts >= 1, one per stage"),
    ("model.blocks", (3, 0, 6, 3), "(3, 4, 6, 3) with model.block=bottleneck is ResNet-50"),
    ("model.block", "wide", "choose one of ('bottleneck', 'basic')"),
    ("model.base_width", 0, "must be >= 1"),
    ("model.dropout", 0.1, "applies to model.name=wide_resnet only"),
]


@pytest.mark.parametrize("field,value,words", RESNET_CASES, ids=[f"{c[0]}={c[1]}" for c in RESNET_CASES])
def test_resnet_fields_are_checked_with_the_resnet(field, value, words):
  config = test_config.get_config()
  config.model.name = "resnet"
  config.model.depth = 50  # WideResNet's field: resnet does not read it, so no 6n+4 error
  config_validation.validate(config)
  _set(config, field, value)
  with pytest.raises(config_validation.ConfigError, match="config field " + field) as err:
    config_validation.validate(config)
  assert words in str(err.value), str(err.value)
  config.model.name, config.model.depth = "wide_resnet", 10  # the WideResNet reads none of the values above
  config_validation.validate(config)


def test_batches_must_divide_over_devices_and_processes():
  config = test_config.get_config()  # batch 8, mu 2, eval batch 32
  config_validation.validate(config, num_devices=8, num_processes=2)
  with pytest.raises(config_validation.ConfigError, match=r"train.batch_size=8 .*divisible by the 3 devices"):
    config_validation.validate(config, num_devices=3)
  config.train.eval_batch_size = 36
  with pytest.raises(config_validation.ConfigError, match=r"train.eval_batch_size=36 .*multiple of 8"):
    config_validation.validate(config, num_devices=8)
  config.train.eval_batch_size = 32
  config.train.batch_size = 6
  with pytest.raises(config_validation.ConfigError, match=r"train.batch_size=6 .*4 JAX processes"):
    config_validation.validate(config, num_processes=4)


def test_plce_without_bank_is_rejected():
  config = test_config.get_config()
  config.bank.enabled = False
  with pytest.raises(config_validation.ConfigError, match="plce.enabled=True .*enable bank"):
    config_validation.validate(config)


def test_a_per_epoch_decay_interval_longer_than_the_epoch_is_flagged(caplog):
  """With the reference's per-epoch counter, an interval longer than the epoch never decays the bank: legal (the
  reference does so), but said."""
  config = test_config.get_config()
  config.train.steps_per_epoch = 2
  config.bank.decay_clock = "epoch"
  caplog.set_level(logging.WARNING)
  config_validation.validate(config)  # decay_every 2 <= 2
  assert "never decays" not in caplog.text
  config.bank.decay_every.value = 3.0
  config_validation.validate(config)
  assert "bank.decay_every=3 exceeds train.steps_per_epoch=2 with bank.decay_clock=epoch" in caplog.text
  assert "never decays" in caplog.text
  caplog.clear()
  config.bank.decay_clock = "global"
  config_validation.validate(config)
  assert "never decays" not in caplog.text


def test_unknown_field_fails_on_a_locked_config():
  config = test_config.get_config()
  config.lock()  # as the command line does (config_flags lock_config=True)
  with pytest.raises(AttributeError):
    config.train.totl_steps = 3
