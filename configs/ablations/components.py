"""The paper's component ablation in miniature: FixMatch vs ACR vs SeMi, SeMi's parts added and removed.

  python -m semi_jax.sweep --config=configs/ablations/components.py --workdir=/tmp/components
  python -m semi_jax.report --workdir=/tmp/components
  python -m semi_jax.report --workdir=/tmp/components --reference=acr --paired_on=pl_precision  # SeMi vs ACR
Base: configs/digits_lt_reversed.py; `:base=digits_lt` for the easier embedded split, `:base=cifar10_lt,dist=reversed`
etc. for the paper's settings.

  variant          configuration
  fixmatch         FixMatch preset: one head, no SeMi component
  acr              ACR preset: dual head with logit adjustment, no SeMi component
  acr_miner        ACR + entropy hard-example mining (OHEML)
  acr_miner_plce   ACR + OHEML + memory bank with prototype label mixing (PLCE); SeMi without Lcons
  semi             SeMi: ACR + OHEML + bank/PLCE + projection consistency Lcons
  semi_no_miner    SeMi without OHEML
  semi_no_bank     SeMi without the memory bank (and so without PLCE, which reads its prototypes)
Every variant sets all preset switches, so a base argument such as algo=acr cannot leak into it. Variants that
are no preset run as ssl.algo=custom: a run is never labelled with an algorithm it does not train.
"""
from configs import default
from configs.ablations import base_config

SEEDS = (0, 1, 2)
CUSTOM = {"ssl.algo": default.CUSTOM}


def get_config(arg=None):
  return base_config(arg)


def algo_overrides(algo: str) -> dict:
  """The fields an algorithm preset sets (configs/default.apply_algo), as sweep overrides."""
  config = default.apply_algo(default.get_config(), algo)
  keys = ["ssl.algo", "ssl.dual_head", "ssl.labeled_logit_adjust"]
  keys += [f"{name}.enabled" for name in default.COMPONENTS]
  return {key: config[key.split(".")[0]][key.split(".")[1]] for key in keys}


def get_sweep(arg=None):
  del arg  # the variants are switches only: the same for every base
  acr, semi = algo_overrides("acr"), algo_overrides("semi")
  return [
      ("fixmatch", algo_overrides("fixmatch")),
      ("acr", acr),
      ("acr_miner", {**acr, **CUSTOM, "miner.enabled": True}),
      ("acr_miner_plce", {**acr, **CUSTOM, "miner.enabled": True, "bank.enabled": True, "plce.enabled": True}),
      ("semi", semi),
      ("semi_no_miner", {**semi, **CUSTOM, "miner.enabled": False}),
      ("semi_no_bank", {**semi, **CUSTOM, "bank.enabled": False, "plce.enabled": False}),
  ]
