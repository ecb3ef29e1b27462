"""The sweep of tests/together_test.py: three decay variants (a schedule kind changed, a ramp replaced) on the
test config for 20 steps, with model.leaky_slope = 1 (no activation kink; see that test's docstring)."""
from configs import test
from configs.ablations import decay

SEEDS = (0, 1)
BASE = "base=test,steps=20"


def get_config(arg=None):
  del arg
  config = test.get_config("steps=20")
  config.model.leaky_slope = 1.0
  return config


def get_sweep(arg=None):
  del arg
  return [v for v in decay.get_sweep(BASE) if v[0] in ("reference", "beta_anneal", "ramp_constant")]
