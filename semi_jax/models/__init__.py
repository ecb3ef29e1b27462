"""Models. `create_model(config.model, num_classes, cpu_fast_paths)` builds the configured one."""
from semi_jax.models.wide_resnet import WideResNet

MODELS = ("wide_resnet",)
DTYPES = ("float32", "bfloat16")  # compute dtypes; parameters, BatchNorm statistics and losses stay float32


def create_model(model_config, num_classes: int, cpu_fast_paths: bool = False) -> WideResNet:
  """The model of `model_config`; `cpu_fast_paths` swaps in semi_jax.cpu's layers (see `semi_jax.cpu.enabled`)."""
  if model_config.name not in MODELS:
    raise ValueError(f"unknown model {model_config.name!r} (config field model.name); available: {MODELS}.")
  if model_config.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {DTYPES}, got {model_config.dtype!r}.")
  import jax.numpy as jnp
  return WideResNet(num_classes=num_classes, depth=model_config.depth, width=model_config.width,
                    dropout=model_config.dropout, bn_momentum=model_config.bn_momentum,
                    leaky_slope=model_config.leaky_slope, dtype=jnp.dtype(model_config.dtype),
                    cpu_fast_paths=cpu_fast_paths)
