"""python -m semi_jax.main --config=configs/digits_lt.py --workdir=DIR [--config.a.b=v ...]"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from semi_jax import config_files

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (resumes if it holds a run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from semi_jax import startup
  try:
    malloc = startup.prepare(FLAGS.config.cpu_fast_paths)
  except ValueError as e:
    sys.exit(f"semi_jax: bad configuration: {e}")
  import jax
  from semi_jax import checkpointing, config_validation, distributed, train
  distributed.maybe_initialize()
  logging.info("JAX process %d/%d, %d local / %d global devices (%s); malloc: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
               malloc)
  try:
    summary = train.Trainer(FLAGS.config, FLAGS.workdir).run()
  except (ValueError, FloatingPointError, checkpointing.CheckpointIOError) as e:
    # Bad input (config value, missing data set, wrong image size, workdir holding another run), divergence and
    # unreadable storage end with their message, not a traceback; --verbosity=1 shows where it came from.
    logging.debug("Traceback", exc_info=True)
    kind = "bad configuration" if isinstance(e, config_validation.ConfigError) else type(e).__name__
    sys.exit(f"semi_jax: {kind}: {e}")
  if summary.get("preempted"):
    # The checkpoint and logs are written. A preempted host has seconds left: leave together with the other
    # processes and skip tearing down the input pipeline (its threads would finish augmenting first).
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported (in main)
  app.run(main, flags_parser=lambda argv: config_files.parse_flags(FLAGS, argv, "semi_jax"))
