"""Prepares a data set's TFDS files once, before training: runs never download, they read prepared data.

  python -m semi_jax.tools.prepare_data --dataset=cifar10 [--data_dir=DIR] [--config=configs/X.py[:args]]
  python -m semi_jax.tools.prepare_data --dataset=cifar10 --data_dir=DIR --check
  python -m semi_jax.tools.prepare_data --list

DIR is a local folder or gs://BUCKET/PATH; by default data.data_dir of the config, else $TFDS_DATA_DIR, else
~/tensorflow_datasets: where a run looks (`semi_jax.datasets.tfds_sources.data_dir_of`). The data set is built by
TFDS's own builder (`tfds.builder(name, data_dir=DIR).download_and_prepare()`), and only where it is not
prepared there yet. Then the command prints every split's size and the per-class counts of the labeled,
unlabeled (and validation) sets that the config's run draws: it loads the prepared data and splits it with the
code a run uses (`semi_jax.datasets.load`, `semi_jax.input_pipeline.make_ssl_data`), so the counts are the run's
and the data is known to load. The config is the configs/ file of the data set (e.g. configs/cifar10_lt.py)
unless --config names another.

ImageNet-127 (`imagenet_resized`) needs archives that image-net.org gives only to signed-in users: the command
says which files to download by hand and where to put them, then builds the data set from them. `--check`
downloads nothing: it reports whether the data set is ready (exit 0) or not (exit 1, with the command to run).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
import socket
import sys
import types
import urllib.parse
import urllib.request

import numpy as np

PROGRAM = "semi_jax.tools.prepare_data"
TFDS_CATALOG = "https://www.tensorflow.org/datasets/catalog/"
# Data sets a run reads from the package itself (not TFDS).
EMBEDDED = {"digits": "scikit-learn's UCI handwritten digits, shipped with scikit-learn"}
# Config arguments that select another data set than a config file's default (`configs/imagenet127.py:size=64`).
CONFIG_VARIANTS = {"imagenet127": ("size=64",)}
NETWORK_TIMEOUT_S = 10.0


class PrepareError(Exception):
  """A problem the user fixes: reported as one line (the problem, then the fix), exit code 1."""


@dataclasses.dataclass(frozen=True)
class ClassCounts:
  """Per-class counts of the split a run of `spec` draws (`make_ssl_data`)."""
  spec: str
  seed: int
  labeled: np.ndarray
  unlabeled: np.ndarray | None  # None: a separate unlabeled set of unknown classes (STL-10's `unlabelled`)
  num_unlabeled: int
  validation: np.ndarray | None  # None without data.val_per_class


def tfds_module():
  """tensorflow_datasets, imported on first use (seconds)."""
  import tensorflow_datasets as tfds
  return tfds


def tfds_names() -> dict[str, str | None]:
  """Every registered data set (data.name) and its TFDS name; None for one that is not read from TFDS."""
  from semi_jax import datasets
  from semi_jax.datasets import tfds_sources
  return {name: tfds_sources.TFDS_NAMES.get(name) for name in datasets.names()}


def _display(path: str) -> str:
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def repo_config_specs() -> list[str]:
  """The config specs of this checkout's configs/ folder (and their data-set variants); [] without one."""
  from semi_jax import config_files
  specs = []
  for path in sorted(glob.glob(os.path.join(config_files.REPO_CONFIGS, "*.py"))):
    stem = os.path.basename(path)[:-3]
    if stem != "__init__":
      specs += [_display(path)] + [f"{_display(path)}:{arg}" for arg in CONFIG_VARIANTS.get(stem, ())]
  return specs


def configs_using() -> dict[str, list[str]]:
  """data.name -> the repo config specs whose run reads it."""
  using: dict[str, list[str]] = {}
  for spec in repo_config_specs():
    using.setdefault(load_config(spec).data.name, []).append(spec)
  return using


def default_config(name: str) -> str | None:
  """The configs/ spec of data set `name`: the config named after it (configs/cifar10_lt.py for cifar10,
  configs/imagenet127.py:size=64 for imagenet127_64), else the first one that reads it."""
  specs = configs_using().get(name, [])
  for spec in specs:
    stem = os.path.basename(spec.split(".py")[0])
    if stem.startswith(name) or name.startswith(stem):
      return spec
  return specs[0] if specs else None


def load_config(spec: str):
  from semi_jax import config_files
  try:
    return config_files.load(spec)
  except (ValueError, TypeError, KeyError, AttributeError, ImportError, SyntaxError) as e:
    raise PrepareError(f"cannot load the config {spec} ({_first_line(e)}); pass --config=PATH.py[:args] of an "
                       "existing config "
                       "file (e.g. --config=configs/cifar10_lt.py:imb=50).") from e


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _quiet_tfds():
  """Hides the warning TFDS logs while it looks for a data set that is not prepared ("Variant folder ... has no
  dataset_info.json"): this command says so itself."""
  from absl import logging
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def builder_of(tfds_name: str, data_dir: str):
  """TFDS's builder of `tfds_name` in `data_dir`."""
  tfds = tfds_module()
  with _quiet_tfds():
    return tfds.builder(tfds_name, data_dir=data_dir)


def is_prepared(tfds_name: str, data_dir: str, builder=None) -> bool:
  builder = builder or builder_of(tfds_name, data_dir)
  try:
    with _quiet_tfds():
      return builder.is_prepared()
  except Exception as e:  # e.g. a gs:// bucket that does not exist or denies access
    raise PrepareError(f"cannot read the data directory {data_dir} ({type(e).__name__}: {_first_line(e)}); pass "
                       "an existing, readable --data_dir (for gs://, check the bucket name and its access).") from e


def split_sizes(tfds_name: str, data_dir: str) -> dict[str, int]:
  """Every split's example count, from the prepared data set's info."""
  builder = builder_of(tfds_name, data_dir)
  return {split: int(info.num_examples) for split, info in builder.info.splits.items()}


def missing_archives(tfds_name: str, data_dir: str) -> list[str]:
  """The hand-downloaded archives `tfds_name` needs that are not in <data_dir>/downloads/manual/ (none for a data
  set that TFDS downloads itself)."""
  from semi_jax import files
  from semi_jax.datasets import tfds_sources
  manual = tfds_sources.manual_dir_of(data_dir)
  return [a for a in tfds_sources.IMAGENET_RESIZED_ARCHIVES.get(tfds_name, ())
          if not files.exists(files.join(manual, a))]


def manual_step(name: str, tfds_name: str, data_dir: str) -> str:
  """The hand download `tfds_name` needs before it can be prepared in `data_dir`, step by step."""
  from semi_jax.datasets import tfds_sources
  archives = tfds_sources.IMAGENET_RESIZED_ARCHIVES[tfds_name]
  manual = tfds_sources.manual_dir_of(data_dir)
  missing = missing_archives(tfds_name, data_dir)
  command = tfds_sources.prepare_command(name, data_dir)
  return "\n".join([
      f"{name} (TFDS {tfds_name}) needs ImageNet archives that TFDS cannot download: image-net.org gives them only "
      "to signed-in ImageNet users.",
      f"  1. Sign in at {tfds_sources.IMAGENET_DOWNLOAD_PAGE} (an ImageNet account with its terms accepted) and "
      f"download the downsampled-ImageNet archives {', '.join(archives)} (npz format).",
      f"  2. Put them, with these names, into {manual}/ (TFDS's manual download folder; missing now: "
      f"{', '.join(missing) or 'none'}). TFDS checks their checksums.",
      f"  3. Build the data set from them:  {command}",
      f"  4. Check that it worked:  {command} --check",
      f"TFDS documentation: the data set page 'imagenet_resized' ({TFDS_CATALOG}imagenet_resized).",
  ])


def check_writable(data_dir: str) -> None:
  """Creates `data_dir` and writes a file there, so that an unwritable directory fails before any download."""
  from semi_jax import files
  probe = files.join(data_dir, f".prepare_data_probe_{os.getpid()}")
  try:
    files.makedirs(data_dir)
    with files.open(probe, "w") as f:
      f.write("probe\n")
    if files.is_remote(probe):
      files._gfile().remove(probe)
    else:
      os.remove(probe)
  except Exception as e:  # OSError locally, tf.errors.OpError (e.g. PermissionDenied) on gs://
    raise PrepareError(f"cannot write to the data directory {data_dir} ({_first_line(e)}); pass a writable "
                       "--data_dir (or fix its permissions: for gs://, the bucket's write access).") from e


def check_network(builder, tfds_name: str, data_dir: str) -> None:
  """Fails in seconds where the download hosts cannot be reached (TFDS itself retries for minutes). Skipped
  behind a proxy, which only the download itself goes through."""
  if urllib.request.getproxies():
    return
  for url in sorted(builder.url_infos or {}):
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
      continue
    try:
      socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                               timeout=NETWORK_TIMEOUT_S).close()
    except OSError as e:
      raise PrepareError(
          f"no network: cannot reach {parts.hostname} to download {tfds_name} ({_first_line(e)}); run this command "
          f"on a machine with internet access (with --data_dir=gs://BUCKET/tfds every host can then read it) or "
          f"copy a prepared {tfds_name.split('/')[0]} folder into {data_dir}.") from e
    return  # one host answers: the network is up


def prepare(name: str, tfds_name: str, data_dir: str, log=print) -> bool:
  """Builds `tfds_name` in `data_dir` with TFDS's builder unless it is prepared there already.

  Returns:
    True when it is prepared now; False when a hand download is missing (the steps were logged).
  """
  builder = builder_of(tfds_name, data_dir)
  if is_prepared(tfds_name, data_dir, builder):
    log(f"{name} (TFDS {tfds_name}) is already prepared in {data_dir}: nothing downloaded or rebuilt.")
    return True
  manual = tfds_name in _archives()
  if manual and missing_archives(tfds_name, data_dir):
    log(manual_step(name, tfds_name, data_dir))
    return False
  check_writable(data_dir)
  if not manual:
    check_network(builder, tfds_name, data_dir)
  log(f"{name}: preparing TFDS {tfds_name} in {data_dir} "
      f"({'from the archives in downloads/manual' if manual else 'downloading'}; this runs once) ...")
  try:
    builder.download_and_prepare()
  except Exception as e:  # noqa: BLE001: every failure ends in one line with its fix
    raise PrepareError(_download_failure(e, tfds_name, data_dir)) from e
  log(f"{name}: prepared TFDS {tfds_name} in {data_dir}.")
  return True


def _archives():
  from semi_jax.datasets import tfds_sources
  return tfds_sources.IMAGENET_RESIZED_ARCHIVES


def _download_failure(error: Exception, tfds_name: str, data_dir: str) -> str:
  what = f"preparing {tfds_name} in {data_dir} failed ({type(error).__name__}: {_first_line(error)})"
  network = (ConnectionError, TimeoutError, socket.gaierror)
  try:
    import requests
    network += (requests.exceptions.RequestException,)
  except ModuleNotFoundError:
    pass
  if isinstance(error, network) or type(error).__name__ == "DownloadError":
    return (f"{what}: the download did not get through; rerun on a machine with internet access (finished "
            f"downloads in {data_dir}/downloads are reused).")
  if isinstance(error, PermissionError):
    return f"{what}: pass a writable --data_dir (or fix its permissions)."
  if type(error).__name__ == "NonMatchingChecksumError":
    return (f"{what}: a downloaded file is not the one TFDS expects; delete it from {data_dir}/downloads "
            "(for ImageNet: replace the archive in downloads/manual) and rerun.")
  return f"{what}: fix its cause and rerun this command (finished downloads are reused)."


def class_counts(spec: str, config, data_dir: str) -> ClassCounts:
  """The per-class counts of the split a run of `config` draws from the data in `data_dir`: the data set is
  loaded and split as the run does (`datasets.load`, `input_pipeline.make_ssl_data`)."""
  from semi_jax import datasets, input_pipeline
  config = config.copy_and_resolve_references()
  config.data.data_dir = data_dir
  try:
    ds = datasets.load(config.data)
    ssl = input_pipeline.make_ssl_data(ds, config.data, config.seed)
  except ValueError as e:
    raise PrepareError(f"the config {spec} cannot split the data in {data_dir}: {_first_line(e, 600)}") from e
  validation = None
  if int(config.data.val_per_class) > 0:
    validation = np.bincount(ds.train_labels[ssl.val_idx], minlength=ds.num_classes)
  unlabeled = ssl.unlabeled_counts if ssl.unlabeled_idx is not None else None
  return ClassCounts(spec, int(config.seed), ssl.labeled_counts, unlabeled, ssl.num_unlabeled, validation)


def format_counts(counts: ClassCounts) -> str:
  columns = [("labeled", counts.labeled)]
  if counts.unlabeled is not None:
    columns.append(("unlabeled", counts.unlabeled))
  if counts.validation is not None:
    columns.append(("validation", counts.validation))
  lines = [f"class counts of {counts.spec} (seed {counts.seed}), as its run draws them:",
           "  class" + "".join(f"{title:>12}" for title, _ in columns)]
  for c in range(len(counts.labeled)):
    lines.append(f"  {c:>5}" + "".join(f"{int(values[c]):>12,}" for _, values in columns))
  lines.append("  total" + "".join(f"{int(values.sum()):>12,}" for _, values in columns))
  if counts.unlabeled is None:
    lines.append(f"  unlabeled: a separate set of {counts.num_unlabeled:,} images of unknown classes, all used.")
  return "\n".join(lines)


def format_sizes(tfds_name: str, sizes: dict[str, int]) -> str:
  return "\n".join([f"splits of TFDS {tfds_name}:"] + [f"  {split:<12}{n:>12,}" for split, n in sizes.items()])


def list_datasets(data_dir: str, log=print) -> None:
  using = configs_using()
  names = tfds_names()
  log(f"data sets (prepared: in {data_dir}):")
  log(f"  {'data.name':<16}{'TFDS name':<25}{'prepared':<10}configs")
  for name, tfds_name in names.items():
    if tfds_name is None:
      source, prepared = "(embedded)", "always"
    else:
      source, prepared = tfds_name, "yes" if is_prepared(tfds_name, data_dir) else "no"
    log(f"  {name:<16}{source:<25}{prepared:<10}{', '.join(using.get(name, [])) or '-'}")


def resolve(args) -> tuple[str, str | None, object | None, str]:
  """(data set, config spec, config, data directory) of the command line."""
  from semi_jax.datasets import tfds_sources
  names = tfds_names()
  spec = args.config
  config = load_config(spec) if spec else None
  name = args.dataset or (config.data.name if config is not None else None)
  if not name:
    raise PrepareError("no data set given; pass --dataset=NAME (see --list) or --config=configs/X.py.")
  if name not in names:
    raise PrepareError(f"unknown data set {name!r}; pass --dataset= one of {', '.join(names)} "
                       "(--list shows their TFDS names and configs).")
  if config is None:
    spec = default_config(name)
    config = load_config(spec) if spec else None
  elif config.data.name != name:
    raise PrepareError(f"the config {spec} reads the data set {config.data.name!r}, not {name!r}; pass "
                       f"--dataset={config.data.name} or a config whose data.name is {name!r}.")
  data_dir = args.data_dir or tfds_sources.data_dir_of(
      config.data if config is not None else types.SimpleNamespace(data_dir=""))
  return name, spec, config, data_dir


def run(args, log=print) -> int:
  """The command; returns its exit code. PrepareError carries the one-line failures."""
  from semi_jax.datasets import tfds_sources
  if args.list:
    list_datasets(args.data_dir or tfds_sources.data_dir_of(types.SimpleNamespace(data_dir="")), log)
    return 0
  name, spec, config, data_dir = resolve(args)
  tfds_name = tfds_names()[name]
  if tfds_name is None:
    log(f"{name}: {EMBEDDED.get(name, 'not read from TFDS')}: nothing to prepare, it is always ready.")
  elif args.check:
    if not is_prepared(tfds_name, data_dir):
      log(f"{name} (TFDS {tfds_name}) is NOT prepared in {data_dir}.")
      if tfds_name in _archives():
        missing = missing_archives(tfds_name, data_dir)
        log(f"ImageNet archives in {tfds_sources.manual_dir_of(data_dir)}/: "
            + (f"missing {', '.join(missing)}" if missing else "all present"))
      log(f"Prepare it with:  {tfds_sources.prepare_command(name, data_dir)}")
      return 1
    log(f"{name} (TFDS {tfds_name}) is prepared in {data_dir}.")
  elif not prepare(name, tfds_name, data_dir, log):
    return 1
  if tfds_name is not None:
    log(format_sizes(tfds_name, split_sizes(tfds_name, data_dir)))
  if config is None:
    log(f"no configs/ file reads {name}: pass --config=PATH.py to print the class counts of its split.")
  elif args.counts:
    log(format_counts(class_counts(spec, config, data_dir)))
  if args.check:
    log(f"{name}: ready.")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=f"python -m {PROGRAM}", description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="", help="data set (data.name) to prepare; --list shows them")
  parser.add_argument("--data_dir", default="", help="TFDS data directory, local or gs:// (default: the config's "
                      "data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
  parser.add_argument("--config", default="", help="config file whose split counts to print, PATH.py[:args] "
                      "(default: the configs/ file of the data set)")
  parser.add_argument("--check", action="store_true", help="download nothing: exit 0 if the data set is ready, "
                      "1 (with the command that prepares it) if not")
  parser.add_argument("--list", action="store_true", help="the data sets, their TFDS names and their configs")
  parser.add_argument("--counts", action=argparse.BooleanOptionalAction, default=True,
                      help="load the data and print the per-class counts of the config's split")
  args = parser.parse_args(argv)
  try:
    return run(args)
  except PrepareError as e:
    print(f"{PROGRAM}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
