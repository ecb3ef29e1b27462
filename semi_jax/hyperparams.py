"""Hyper-parameters as data: the config fields that several runs can differ in and still be one program.

A run's config is baked into its jitted step as Python constants. To train several runs as one program (a leading
run axis, `jax.vmap`; see semi_jax.together), the fields in which they differ must instead be inputs of the step:
every schedule (kind included, as `schedules.ScheduleArrays`), the scalar fields below, which the step only
does arithmetic with, and the choices below, which it computes every option of and selects. Every other field
(shapes, component switches, other strings, the data set, the model) is the program's structure: runs that
differ there are different programs (`structure`).
"""
from __future__ import annotations

import copy
import json

import ml_collections
import numpy as np

from semi_jax import schedules, semi_state

# Scalars the step uses only in arithmetic (never for a shape, a Python branch or a static argument).
SCALAR_FIELDS = ("optim.lr", "optim.momentum", "optim.weight_decay", "optim.ema_decay", "ssl.temperature",
                 "ssl.tau1", "ssl.tau12", "ssl.tau2", "ssl.est_epoch", "plce.alpha", "plce.tau_tar", "cons.weight",
                 "cons.proto_t", "cons.center_momentum")


# Choices among named options that the step can compute all of and select by a traced index
# (`semi_state.choose`).
CHOICE_FIELDS = {"bank.decay_clock": semi_state.DECAY_CLOCKS, "plce.class_weight": semi_state.CLASS_WEIGHTS,
                 "plce.class_weight_counts": semi_state.COUNT_WINDOWS}


def schedule_fields(config) -> tuple[str, ...]:
  """The dotted names of the config's schedules (groups of exactly the schedule keys), e.g. 'bank.beta'."""
  names = []
  for group, fields in config.items():
    if isinstance(fields, ml_collections.ConfigDict):
      names += [f"{group}.{name}" for name, field in fields.items()
                if isinstance(field, ml_collections.ConfigDict) and set(field.keys()) == set(schedules.FIELD_TYPES)]
  return tuple(names)


def traceable_fields(config) -> tuple[str, ...]:
  return SCALAR_FIELDS + tuple(CHOICE_FIELDS) + schedule_fields(config)


def _get(config, dotted: str):
  group, name = dotted.split(".")
  return config[group][name]


def _plain(value):
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def structure(config) -> str:
  """The config without its traceable fields and seed, as canonical JSON: runs with equal structure can be
  trained as one program."""
  d = copy.deepcopy(config.to_dict())
  d.pop("seed", None)
  for dotted in traceable_fields(config):
    group, name = dotted.split(".")
    d[group].pop(name)
  return json.dumps(d, sort_keys=True)


def varying(configs) -> tuple[str, ...]:
  """The traceable fields whose values differ among `configs` (of one structure)."""
  fields = traceable_fields(configs[0])
  return tuple(f for f in fields if any(_plain(_get(c, f)) != _plain(_get(configs[0], f)) for c in configs[1:]))


def values(config, fields) -> dict:
  """{field: numpy value} of `fields` of a run's config: schedules as `schedules.ScheduleArrays`, choices as the
  int32 index of the option, integer fields as int32 and the others as float32."""
  out = {}
  for f in fields:
    v = _get(config, f)
    if isinstance(v, ml_collections.ConfigDict):
      out[f] = schedules.as_arrays(v, config.train.total_steps, config.train.steps_per_epoch)
    elif f in CHOICE_FIELDS:
      out[f] = np.int32(CHOICE_FIELDS[f].index(v))
    else:
      out[f] = np.int32(v) if isinstance(v, int) else np.float32(v)
  return out


def bind(config, hp: dict):
  """A copy of `config` whose fields in `hp` hold those (traced) values instead: what a step reads for one run
  of a stacked program. Schedules become `ScheduleArrays`, which `schedules.of_run` evaluates."""
  if not hp:
    return config
  bound = copy.deepcopy(config)
  bound.unlock()
  with bound.ignore_type():
    for dotted, value in hp.items():
      group, name = dotted.split(".")
      bound[group][name] = value
  return bound
