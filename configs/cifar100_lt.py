"""CIFAR-100-LT (paper setting N1=150, M1=300, gamma=10, WRN-28-2)."""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "cifar100"
  config.data.labeled_max = 150
  config.data.labeled_imb = 10.0
  config.data.unlabeled_max = 300
  config.data.unlabeled_imb = 10.0
  config.ssl.est_epoch = 20
  config.bank.decay_every.value = 200.0
  config.cons.proto_t = 0.09
  config.eval.many_threshold = 100
  config.eval.few_threshold = 20
  return default.apply_args(config, arg)
