"""The algorithms and the named choices of the method: presets, component switches and the options of the
choice fields. Declared here, once, next to the code that gives them meaning; `configs/default.py`,
`config_validation` and `hyperparams` import them.

FixMatch, FixMatch+LA, ACR and SeMi are presets of one step: switches that turn SeMi's parts on or off
(`preset_switches`). A combination that is no preset runs as `custom` (component ablations).
"""
from __future__ import annotations

ALGOS = ("fixmatch", "fixmatch_la", "acr", "semi")
COMPONENTS = ("miner", "bank", "plce", "cons")  # SeMi's parts, each a config group with an `enabled` switch
CUSTOM = "custom"  # ssl.algo of a combination of switches that is no preset (component ablations)

# Options of the choice fields (the step can compute all of them and select one per run: see hyperparams).
CLASS_WEIGHTS = ("frequency", "decayed_frequency", "decayed_inverse", "uniform")  # plce.class_weight
DECAY_CLOCKS = ("epoch", "global")  # bank.decay_clock
COUNT_WINDOWS = ("run", "epoch")  # plce.class_weight_counts


def preset_switches(algo: str) -> dict[str, bool]:
  """The switches that make the config the named algorithm: {dotted config field: value}."""
  if algo not in ALGOS:
    raise ValueError(f"unknown algorithm {algo!r} (config field ssl.algo / argument algo=); choose one of {ALGOS}.")
  switches = {"ssl.dual_head": algo in ("acr", "semi"), "ssl.labeled_logit_adjust": algo == "fixmatch_la"}
  switches.update({f"{name}.enabled": algo == "semi" for name in COMPONENTS})
  return switches


def switches_of(config) -> dict[str, bool]:
  """The switches a config actually runs with: {dotted config field: value}, as `preset_switches` names them."""
  return {field: bool(config[field.split(".")[0]][field.split(".")[1]]) for field in preset_switches("semi")}


def preset_mismatch(config) -> dict[str, tuple[bool, bool]]:
  """{field: (value, the preset's value)} where the switches differ from the preset named by ssl.algo."""
  if config.ssl.algo == CUSTOM:
    return {}
  have = switches_of(config)
  return {f: (have[f], v) for f, v in preset_switches(config.ssl.algo).items() if have[f] != v}
