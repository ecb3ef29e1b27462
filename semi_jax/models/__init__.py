"""Models. `create_model(config.model, num_classes, cpu_fast_paths)` builds the configured one.

Both return `(logits, logits_balanced, features)` and have `feature_dim`, so the objective, the memory bank and
the miner work with either. Fields of `config.model` that apply to one model only: wide_resnet reads depth,
width, dropout and leaky_slope; resnet reads blocks, block and base_width. Both read bn_momentum and dtype.
"""
from semi_jax.models.layers import PerRun
from semi_jax.models.resnet import ResNet
from semi_jax.models.wide_resnet import WideResNet

MODELS = ("wide_resnet", "resnet")
DTYPES = ("float32", "bfloat16")  # compute dtypes; parameters, BatchNorm statistics and losses stay float32


def create_model(model_config, num_classes: int, cpu_fast_paths: bool = False,
                 per_run: PerRun | None = None) -> WideResNet | ResNet:
  """The model of `model_config`; `cpu_fast_paths` swaps in semi_jax.cpu's layers (see `semi_jax.cpu.enabled`),
  `per_run` makes its convolutions batch over a stacked program's runs one run at a time."""
  if model_config.name not in MODELS:
    raise ValueError(f"unknown model {model_config.name!r} (config field model.name); available: {MODELS}.")
  if model_config.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {DTYPES}, got {model_config.dtype!r}.")
  import jax.numpy as jnp
  common = dict(num_classes=num_classes, bn_momentum=model_config.bn_momentum, dtype=jnp.dtype(model_config.dtype),
                cpu_fast_paths=cpu_fast_paths, per_run=per_run)
  if model_config.name == "resnet":
    return ResNet(blocks=tuple(model_config.blocks), block=model_config.block, base_width=model_config.base_width,
                  **common)
  return WideResNet(depth=model_config.depth, width=model_config.width, dropout=model_config.dropout,
                    leaky_slope=model_config.leaky_slope, **common)
