"""Embedded default: long-tailed UCI handwritten digits (ships with scikit-learn, no download).

1,797 8x8 digit images; 30 per class held out as a balanced test set; the rest form a long-tailed labeled set
(N1=40, gamma=10) and unlabeled set (M1=100, gamma=10). Trains to completion on a 2-core CPU in minutes.
  python -m semi_jax.main --config=configs/digits_lt.py --workdir=/tmp/digits
  python -m semi_jax.main --config=configs/digits_lt.py:algo=fixmatch,dist=reversed --workdir=/tmp/digits_fm
"""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.labeled_max = 40
  config.data.labeled_imb = 10.0
  config.data.unlabeled_max = 100
  config.data.val_per_class = 5  # held out before the split (the head class has 148 training images, 140 used)
  config.data.unlabeled_imb = 10.0
  config.model.depth = 10
  config.model.width = 2
  config.train.batch_size = 32
  config.train.mu = 2
  config.train.total_steps = 1000
  config.train.steps_per_epoch = 50
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 200
  config.train.checkpoint_every_steps = 500
  config.train.eval_batch_size = 300
  # A 1,000-step run: with the 250k-step averages (0.999) the EMA weights and the BatchNorm running
  # statistics would still carry ~37% of their initial values at the end.
  config.optim.ema_decay = 0.99
  config.model.bn_momentum = 0.99
  config.ssl.est_epoch = 2
  config.ssl.threshold.value = 0.95
  config.bank.size = 16
  config.bank.decay_every.value = 25.0
  config.cons.proto_t = 0.1
  config.eval.many_threshold = 20
  config.eval.few_threshold = 8
  return default.apply_args(config, arg)
