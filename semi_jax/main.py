"""python -m semi_jax.main --config=configs/digits_lt.py --workdir=DIR [--config.a.b=v ...]; --help says more."""
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
    # A shorter run (--config.train.total_steps=N) scales the fields tied to the run length, as :steps=N does.
    for note in config_files.fit_to_length(FLAGS.config, config_files.flag_spec(sys.argv),
                                           explicit=FLAGS["config"].override_values):
      logging.info("config: %s", note)
    malloc = startup.prepare(FLAGS.config.cpu_fast_paths)
  except ValueError as e:
    sys.exit(f"semi_jax: bad configuration: {e}")
  import jax
  from semi_jax import distributed, faults, train
  faults.capture("semi_jax")
  try:
    distributed.maybe_initialize()
    logging.info("JAX process %d/%d, %d local / %d global devices (%s); malloc: %s", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
                 malloc)
    summary = train.Trainer(FLAGS.config, FLAGS.workdir).run()
  except Exception as e:  # noqa: BLE001 - every fault ends in one line (faults.describe), the traceback in the log
    faults.exit_with(e, "semi_jax", FLAGS.workdir)
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
  from semi_jax import usage
  app.run(main, flags_parser=lambda argv: config_files.parse_flags(FLAGS, argv, "semi_jax", usage.main_usage))
