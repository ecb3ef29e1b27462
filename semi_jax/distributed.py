"""Multi-process start-up with JAX's own runtime (jax.distributed)."""
import os

import jax
from absl import logging


def maybe_initialize() -> None:
  """Initialises jax.distributed when this is one process of several.

  On Cloud TPU pods and SLURM, JAX discovers the cluster itself (SEMI_JAX_DISTRIBUTED=1 forces the call);
  elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
  auto = os.environ.get("SEMI_JAX_DISTRIBUTED") == "1" or "SLURM_NTASKS" in os.environ or (
      "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"])
  if explicit:
    jax.distributed.initialize(coordinator_address=explicit,
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
