"""Multi-process start-up with JAX's own runtime (jax.distributed).

Every process of a multi-host run must call `maybe_initialize()` before its first JAX computation. Three ways
to describe the cluster:
  * explicitly: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (0 .. N-1) in
    every process (several GPU hosts, or several CPU processes);
  * automatically on Cloud TPU VMs (TPU chips and libtpu present, or TPU_WORKER_HOSTNAMES set) and in a SLURM
    job step (`srun`) of more than one task: jax.distributed.initialize() finds the coordinator and the process
    id itself;
  * SEMI_JAX_DISTRIBUTED=1 forces the automatic call anywhere (e.g. Open MPI), SEMI_JAX_DISTRIBUTED=0 turns
    it off.
Cross-process collectives on CPU go through gloo (set before the CPU backend is created).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from typing import Any, Mapping

import jax
from absl import logging

EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
SWITCH_VAR = "SEMI_JAX_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to call jax.distributed.initialize: all None means "let JAX detect the cluster"."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _tpu_chips_present() -> bool:
  # The device files of a Cloud TPU VM's chips (v2-v4: /dev/accel*, v5e and newer: /dev/vfio/<n>), and the TPU
  # runtime JAX needs to use them: VFIO devices alone also appear on GPU VMs with passed-through devices.
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _int_var(environ: Mapping[str, str], name: str) -> int:
  value = environ.get(name)
  if value is None:
    raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {name} is not; set all of {', '.join(EXPLICIT_VARS)} "
                     "in every process (or unset JAX_COORDINATOR_ADDRESS).")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def plan(environ: Mapping[str, str] | None = None, tpu_chips_present: bool | None = None) -> Plan | None:
  """What `maybe_initialize` will do in this environment; None: a single process, no initialisation."""
  environ = os.environ if environ is None else environ
  switch = environ.get(SWITCH_VAR, "")
  if switch not in ("", "0", "1"):
    raise ValueError(f"{SWITCH_VAR}={switch!r}; use 1 (initialise jax.distributed), 0 (never) or leave it unset "
                     "(automatic).")
  if switch == "0":
    return None
  address = environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    if ":" not in address:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} needs a port: host:port (e.g. 10.0.0.2:1234).")
    num, pid = _int_var(environ, "JAX_NUM_PROCESSES"), _int_var(environ, "JAX_PROCESS_ID")
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f"JAX_PROCESS_ID={pid} must lie in [0, JAX_NUM_PROCESSES={num}).")
    return Plan(address, num, pid)
  if switch == "1":
    return Plan()
  slurm_step = "SLURM_PROCID" in environ and "SLURM_STEP_NODELIST" in environ  # inside `srun`
  if slurm_step and environ.get("SLURM_NTASKS", "1").isdigit() and int(environ["SLURM_NTASKS"]) > 1:
    return Plan()
  if "TPU_WORKER_HOSTNAMES" in environ:  # GKE TPU slices
    return Plan()
  if tpu_chips_present is None:
    tpu_chips_present = _tpu_chips_present()
  if tpu_chips_present and environ.get("JAX_PLATFORMS", "") in ("", "tpu") and "TPU_SKIP_MDS_QUERY" not in environ:
    return Plan()  # a Cloud TPU VM: JAX reads the worker list of the slice from the metadata server
  return None


def maybe_initialize() -> bool:
  """Initialises jax.distributed when this is one process of several; returns whether it did."""
  if jax.distributed.is_initialized():
    return True
  p = plan()
  if p is None:
    return False
  # gloo is jax 0.12's default for CPU collectives; without one, a multi-process CPU computation fails.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=p.coordinator_address, num_processes=p.num_processes,
                             process_id=p.process_id)
  logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
  return True


# Decisions that every process must take alike (which checkpoint to restore, whether a workdir is free, the
# groups of a sweep) are exchanged through the coordination service's key-value store (host to host), not through
# device collectives: a process that raises right after a device collective tears its devices down at exit (jax's
# atexit clears the backends before jax.distributed's shutdown barrier), which can leave the other processes
# waiting inside that collective forever. Every process must make the same calls in the same order.
_exchanges = [0]


def _client():
  import orbax.checkpoint as ocp  # the client jax.distributed.initialize created, as orbax reaches it
  return ocp.multihost.get_jax_distributed_client()


def _timeout_ms() -> int:
  import orbax.checkpoint as ocp  # the timeout orbax's own cross-process waits use
  return ocp.multihost.coordination_timeout() * 1000


def exchange(name: str, value: Any) -> list:
  """Every process's JSON-serialisable `value`, in process order (all processes call it in turn)."""
  if jax.process_count() == 1:
    return [value]
  _exchanges[0] += 1
  key = f"semi_jax/{_exchanges[0]}-{name}"
  _client().key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
  return [json.loads(_client().blocking_key_value_get(f"{key}/{p}", _timeout_ms()))
          for p in range(jax.process_count())]


def agreed(name: str, value: Any) -> Any:
  """Process 0's `value`, on every process: e.g. a directory listing, which on a shared file system may differ
  between hosts for a moment, or a plan decided from such listings."""
  return exchange(name, value)[0]


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier of this name."""
  if jax.process_count() > 1:
    _exchanges[0] += 1
    _client().wait_at_barrier(f"semi_jax/{_exchanges[0]}-{name}", _timeout_ms())
