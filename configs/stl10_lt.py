"""STL-10-LT: long-tailed labeled `train` split (N1=450, gamma_l=10), the 100k `unlabelled` split as the
unlabeled set (unknown distribution), images resized to 32x32 as in the reference."""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "stl10"
  config.data.image_size = 32
  config.data.labeled_max = 450
  config.data.labeled_imb = 10.0
  config.ssl.est_epoch = 2
  config.bank.decay_every.value = 100.0
  config.cons.proto_t = 0.09
  config.eval.many_threshold = 200
  config.eval.few_threshold = 60
  return default.apply_args(config, arg)
