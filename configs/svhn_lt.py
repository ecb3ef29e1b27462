"""SVHN-LT (N1=1500, M1=3000, gamma=100, WRN-28-2)."""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "svhn"
  config.data.labeled_max = 1500
  config.data.labeled_imb = 100.0
  config.data.unlabeled_max = 3000
  config.data.unlabeled_imb = 100.0
  config.ssl.est_epoch = 2
  config.bank.decay_every.value = 100.0
  config.cons.proto_t = 0.09
  return default.apply_args(config, arg)
