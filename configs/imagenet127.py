"""ImageNet-127 (ImageNet's 1000 classes grouped into 127, natural long tail), 32x32 by default; 10% of every
class labeled, the rest unlabeled. The argument `size=64` selects the 64x64 version:
`--config=configs/imagenet127.py:size=64,algo=acr`. The backbone is ResNet-50 (features D = 2048), as in the
paper and the reference's `--arch resnet`, with torch's default BatchNorm momentum 0.1 (decay 0.9)."""
from configs import default


def get_config(arg=None):
  items = [kv for kv in (arg or "").split(",") if kv]
  sizes = [kv.split("=", 1)[1] for kv in items if kv.startswith("size=")]
  size = int(sizes[-1]) if sizes else 32
  if size not in (32, 64):
    raise ValueError(f"imagenet127: size must be 32 or 64, got {size}.")
  arg = ",".join(kv for kv in items if not kv.startswith("size="))
  config = default.get_config()
  config.data.name = f"imagenet127_{size}"
  config.data.image_size = size
  config.data.labeled_fraction = 0.1
  config.model.name = "resnet"
  config.model.blocks = (3, 4, 6, 3)
  config.model.block = "bottleneck"
  config.model.base_width = 64
  config.model.bn_momentum = 0.9
  config.ssl.est_epoch = 2
  config.bank.decay_every.value = 200.0
  config.cons.proto_t = 0.09
  config.eval.many_threshold = 1000
  config.eval.few_threshold = 200
  return default.apply_args(config, arg)
