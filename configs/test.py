"""Tiny configuration for the test suite: WRN-10-1 on 8x8 digits, a few steps, every SeMi part active."""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.test_per_class = 10
  config.data.labeled_max = 20
  config.data.labeled_imb = 4.0
  config.data.unlabeled_max = 40
  config.data.unlabeled_imb = 4.0
  config.data.prefetch = 1
  config.model.depth = 10
  config.model.width = 1
  config.train.batch_size = 8
  config.train.mu = 2
  config.train.total_steps = 3
  config.train.steps_per_epoch = 1
  config.train.log_every_steps = 1
  config.train.eval_every_steps = 2
  config.train.checkpoint_every_steps = 2
  config.train.eval_batch_size = 32
  config.train.print_table = False
  config.ssl.est_epoch = 0  # SeMi parts from the second step on
  config.ssl.threshold.value = 0.12  # an untrained 10-class model is rarely more confident: masks must be on
  config.bank.size = 4
  config.bank.decay_every.value = 2.0
  config.bank.decay_clock = "global"  # epochs of one step: the per-epoch clock would never reach 2
  config.eval.many_threshold = 10
  config.eval.few_threshold = 6
  # flax's layers, as GPUs and TPUs run them, and programs JAX's compile cache can store (oneDNN calls cannot be
  # serialised); tests that run the CPU fast paths set "on" and compare the two.
  config.cpu_fast_paths = "off"
  return default.apply_args(config, arg)
