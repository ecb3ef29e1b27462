"""Models. `create_model(config.model, num_classes)` builds the configured one."""
from semi_jax.models.wide_resnet import WideResNet


def create_model(model_config, num_classes: int) -> WideResNet:
  if model_config.name != "wide_resnet":
    raise ValueError(f"unknown model {model_config.name!r} (config field model.name); available: wide_resnet.")
  import jax.numpy as jnp
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if model_config.dtype not in dtypes:
    raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {model_config.dtype!r}.")
  return WideResNet(num_classes=num_classes, depth=model_config.depth, width=model_config.width,
                    dropout=model_config.dropout, bn_momentum=model_config.bn_momentum,
                    leaky_slope=model_config.leaky_slope, dtype=dtypes[model_config.dtype])
