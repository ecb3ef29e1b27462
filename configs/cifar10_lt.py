"""CIFAR-10-LT (paper setting N1=1500, M1=3000, gamma=100, WRN-28-2, 250k steps).

Argument examples: `:dist=reversed`, `:algo=acr`. The paper's second CIFAR-10 setting (N1=500, M1=4000) is
`--config.data.labeled_max=500 --config.data.unlabeled_max=4000 --config.ssl.est_epoch=20`.
"""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "cifar10"
  config.data.labeled_max = 1500
  config.data.labeled_imb = 100.0
  config.data.unlabeled_max = 3000
  config.data.val_per_class = 50  # held out before the split (the head class uses 4,500 of its 5,000 images)
  config.data.unlabeled_imb = 100.0
  config.ssl.est_epoch = 2
  config.bank.decay_every.value = 100.0
  config.cons.proto_t = 0.09
  return default.apply_args(config, arg)
