"""python -m semi_jax.main --config=configs/digits_lt.py --workdir=DIR [--config.a.b=v ...]"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (resumes if it holds a run).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl flag parsing with config mistakes reported in one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = str(e)
    if "Traceback" in message:  # an error raised inside the config file: keep its last line
      message = [line for line in message.splitlines() if line.strip()][-1]
    message = message.strip("'\"").replace("\\'", "'").replace("\\n", " ")
    sys.exit(f"semi_jax: bad configuration: {message}\n"
             "Every field is declared in configs/default.py (see the README's config reference); config "
             "arguments are e.g. --config=configs/cifar10_lt.py:algo=acr,dist=reversed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from semi_jax import host_malloc
  host_malloc.apply_or_exit("semi_jax")  # before TensorFlow and JAX start their threads
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only: keep every accelerator for JAX
  import jax
  from semi_jax import config_validation, distributed, train
  distributed.maybe_initialize()
  logging.info("JAX process %d/%d, %d local / %d global devices (%s); malloc: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
               host_malloc.status)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FloatingPointError) as e:
    # Bad input (config value, missing data set, wrong image size, workdir holding another run) and
    # divergence end with their message, not a traceback; --verbosity=1 shows where it came from.
    logging.debug("Traceback", exc_info=True)
    kind = "bad configuration" if isinstance(e, config_validation.ConfigError) else type(e).__name__
    sys.exit(f"semi_jax: {kind}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
