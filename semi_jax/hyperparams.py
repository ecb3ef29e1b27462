"""Hyper-parameters as data: the config fields a step reads as values, and those several runs can differ in and
still be one program.

Every run's step reads these fields from one dict, `hp` (`of_config`), never from the config: the scalars of
SCALAR_FIELDS, the choices of CHOICE_FIELDS (as the index of the option) and every schedule (as
`schedules.ScheduleArrays`). A run alone holds them as numpy constants, which the compiled step bakes in: a
constant choice computes one option, a schedule of a constant kind one formula. Runs trained together (a leading
run axis, `jax.vmap`; see semi_jax.together) pass the fields in which they differ as traced per-run arrays
instead: the same code then computes every option of a choice, or every kind of a schedule, and selects. Every
other field (shapes, component switches, other strings, the data set, the model) is the program's structure: runs
that differ there are different programs (`structure`).
"""
from __future__ import annotations

import copy
import json
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semi_jax import algorithms, schedules

# Scalars the step uses only in arithmetic (never for a shape, a Python branch or a static argument).
SCALAR_FIELDS = ("optim.lr", "optim.momentum", "optim.weight_decay", "optim.ema_decay", "ssl.temperature",
                 "ssl.tau1", "ssl.tau12", "ssl.tau2", "ssl.est_epoch", "plce.alpha", "plce.tau_tar", "cons.weight",
                 "cons.proto_t", "cons.center_momentum")

# Choices among named options that the step can compute all of and select by a traced index (`choose`).
CHOICE_FIELDS = {"bank.decay_clock": algorithms.DECAY_CLOCKS, "plce.class_weight": algorithms.CLASS_WEIGHTS,
                 "plce.class_weight_counts": algorithms.COUNT_WINDOWS}


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


def value_of(config, field: str):
  """The value of one traceable field as the step reads it: a schedule as `schedules.ScheduleArrays` over the
  run's length, a choice as the int32 index of its option, an integer as int32 and any other scalar as float32."""
  v = _get(config, field)
  if isinstance(v, ml_collections.ConfigDict):
    return schedules.as_arrays(v, config.train.total_steps, config.train.steps_per_epoch)
  if field in CHOICE_FIELDS:
    if v not in CHOICE_FIELDS[field]:
      raise ValueError(f"unknown {field} {v!r}; choose one of {CHOICE_FIELDS[field]}.")
    return np.int32(CHOICE_FIELDS[field].index(v))
  return np.int32(v) if isinstance(v, int) and not isinstance(v, bool) else np.float32(v)


def of_config(config, fields=None) -> dict:
  """{field: value} of `fields` (default: every traceable field) of a run's config (see `value_of`): the `hp`
  a step reads."""
  return {f: value_of(config, f) for f in (traceable_fields(config) if fields is None else fields)}


def stack(hps: list[dict]) -> dict:
  """Per-run `hp` dicts with the same fields as one dict of arrays with a leading run axis."""
  if not hps or not hps[0]:
    return {}
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *hps)


def choose(index, options: tuple[str, ...], branches: dict[str, Callable], field: str = "choice"):
  """`branches[option]()` for the option of `index` (a choice field's value in `hp`, or the option's name). A
  constant index computes that option only; a traced one (runs trained together that differ in the field)
  computes every option and selects. `field` names the config field in errors."""
  if isinstance(index, str):
    if index not in options:
      raise ValueError(f"unknown {field} {index!r}; choose one of {options}.")
    return branches[index]()
  if schedules.is_static(index):
    return branches[options[int(index)]]()
  values = [branches[o]() for o in options]
  return jnp.select([index == i for i in range(len(options))], values)
