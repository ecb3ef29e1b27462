"""TFDS-backed sources: CIFAR-10/100, SVHN, STL-10 and ImageNet-127 (32x32 and 64x64).

Each loader reads whole splits into host memory as uint8 [N, S, S, 3] with S = `data.image_size`: other
sizes are resized bilinearly (with antialiasing, like PIL's resize in the reference's `transforms.Resize`) and
grey images are repeated over three channels. Nothing is downloaded here. The data directory is
`data.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets; a data set that is not prepared there raises
a ValueError that gives the command that prepares it (`python -m semi_jax.tools.prepare_data`, which reads
`TFDS_NAMES` and `IMAGENET_RESIZED_ARCHIVES` from here).

ImageNet-127 groups the 1000 ImageNet classes into 127 WordNet super-classes (`imagenet127_classes.txt`, with
its source in the header) and renumbers them from the largest to the smallest training class, as the
reference does, so that class 0 is the head of the natural long tail like in the other benchmarks.
"""
from __future__ import annotations

import os
import pathlib
import shlex

import numpy as np
from absl import logging

from semi_jax.datasets import ArrayDataset, aligned_empty, num_classes, register

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
# Per-channel statistics of the Small-ImageNet-127 training set used by the reference (for both sizes).
IMAGENET127_MEAN, IMAGENET127_STD = (0.48109809, 0.45747185, 0.40785507), (0.26040889, 0.2532126, 0.26820634)

IMAGENET127_NUM_CLASSES = 127
IMAGENET127_CLASSES_FILE = pathlib.Path(__file__).with_name("imagenet127_classes.txt")

_CHUNK = 4096  # images converted per tf.data batch: bounds the extra memory beyond the final array

# The TFDS data set behind every registered TFDS source (data.name -> TFDS name); `digits` is embedded.
TFDS_NAMES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn": "svhn_cropped",
    "stl10": "stl10",
    "imagenet127_32": "imagenet_resized/32x32",
    "imagenet127_64": "imagenet_resized/64x64",
}
# The downsampled-ImageNet archives TFDS's `imagenet_resized` builder reads (their names in its checksums file).
# image-net.org serves them only to signed-in ImageNet users, so TFDS cannot fetch them: they are downloaded by
# hand into <data_dir>/downloads/manual/, where TFDS's download manager takes them instead of downloading.
IMAGENET_RESIZED_ARCHIVES = {
    "imagenet_resized/32x32": ("Imagenet32_train_npz.zip", "Imagenet32_val_npz.zip"),
    "imagenet_resized/64x64": ("Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip",
                               "Imagenet64_val_npz.zip"),
}
IMAGENET_DOWNLOAD_PAGE = "https://image-net.org/download-images"


def data_dir_of(data_config) -> str:
  """The TFDS data directory a loader reads: data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return (data_config.data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def manual_dir_of(data_dir: str) -> str:
  """Where TFDS looks for manually downloaded files of a data set prepared in `data_dir`."""
  return os.path.join(data_dir, "downloads", "manual")


def prepare_command(name: str, data_dir: str) -> str:
  """The command that prepares the registered data set `name` in `data_dir`."""
  return f"python -m semi_jax.tools.prepare_data --dataset={name} --data_dir={shlex.quote(data_dir)}"


def _how_to_prepare(name: str | None, tfds_name: str, data_dir: str) -> str:
  if name is None:  # a TFDS data set that no registered source reads: TFDS's own call prepares it
    return (f"Prepare it on a machine with internet access with TFDS: tfds.builder('{tfds_name}', "
            f"data_dir='{data_dir}').download_and_prepare().")
  command = prepare_command(name, data_dir)
  if tfds_name in IMAGENET_RESIZED_ARCHIVES:
    return (f"Prepare it with\n  {command}\nafter downloading the ImageNet archives "
            f"{', '.join(IMAGENET_RESIZED_ARCHIVES[tfds_name])} by hand (an ImageNet account is needed: "
            f"{IMAGENET_DOWNLOAD_PAGE}) into {manual_dir_of(data_dir)}/; the command prints these steps.")
  return (f"Prepare it once, on a machine with internet access, with\n  {command}\n(where this machine has "
          f"none, prepare it elsewhere and copy the folder {tfds_name.split('/')[0]} into this machine's data "
          "directory, or prepare it once into a gs:// directory that every host reads).")


def _missing_error(name: str | None, tfds_name: str, data_dir: str) -> ValueError:
  return ValueError(f"TFDS data set {tfds_name!r} is not prepared in the data directory {data_dir} "
                    "(searched: data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets). "
                    + _how_to_prepare(name, tfds_name, data_dir))


def _source_name(tfds_name: str, data_config) -> str | None:
  """The data.name that reads `tfds_name`: the config's own where it does, else the first registered one."""
  if TFDS_NAMES.get(getattr(data_config, "name", None)) == tfds_name:
    return data_config.name
  return next((name for name, tfds in TFDS_NAMES.items() if tfds == tfds_name), None)


def _to_rgb(images, source: str):
  import tensorflow as tf
  channels = images.shape[-1]
  if channels == 3:
    return images
  if channels == 1:  # grey: the model and the augmentations expect RGB
    return tf.repeat(images, 3, axis=-1)
  raise ValueError(f"{source}: images have {channels} channels; expected 1 (grey) or 3 (RGB).")


def read_split(tfds_name: str, split: str, data_config) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of a TFDS image-classification data set into host memory.

  Returns:
    (images uint8 [N, S, S, 3] with S = data.image_size, labels int64 [N]) in the stored order.
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds
  data_dir = data_dir_of(data_config)
  size = int(data_config.image_size)
  source = f"{tfds_name}[{split}]"
  try:
    ds, info = tfds.load(tfds_name, split=split, data_dir=data_dir, download=False, with_info=True)
  except (AssertionError, FileNotFoundError) as e:  # what tfds raises when the prepared files are absent
    if not tfds.builder(tfds_name, data_dir=data_dir).is_prepared():
      raise _missing_error(_source_name(tfds_name, data_config), tfds_name, data_dir) from e
    raise
  stored_shape = tuple(info.features["image"].shape)
  resize = stored_shape[:2] != (size, size)
  if resize:
    logging.info("%s: resizing images from %s to %dx%d (bilinear).", source, stored_shape[:2], size, size)

  def convert(example):  # one image or a batch of them
    images = _to_rgb(example["image"], source)
    if resize:
      images = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
      images = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
    return images, example["label"]

  count = int(ds.cardinality())
  if None in stored_shape:  # images of varying size: convert one by one, then batch
    chunks = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE).batch(_CHUNK)
  else:  # fixed size: convert whole chunks at once (much less per-image overhead on 1.3M ImageNet images)
    chunks = ds.batch(_CHUNK).map(convert, num_parallel_calls=tf.data.AUTOTUNE)
  chunks = tfds.as_numpy(chunks.prefetch(1))
  if count < 0:  # unknown length: collect the chunks
    pairs = list(chunks)
    if not pairs:
      return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64)
    images = aligned_empty((sum(len(p[1]) for p in pairs), size, size, 3), np.uint8)
    return (np.concatenate([p[0] for p in pairs], out=images, casting="unsafe"),
            np.concatenate([p[1] for p in pairs]).astype(np.int64))
  # Known length: fill preallocated arrays, so a large split (ImageNet-64: ~16 GB) is held only once, aligned
  # so that the input pipeline reads it in place.
  images = aligned_empty((count, size, size, 3), np.uint8)
  labels = np.empty((count,), np.int64)
  start = 0
  for batch_images, batch_labels in chunks:
    images[start:start + len(batch_labels)] = batch_images
    labels[start:start + len(batch_labels)] = batch_labels
    start += len(batch_labels)
  if start != count:
    raise ValueError(f"{source}: read {start} images but the split declares {count}.")
  return images, labels


def _labeled_source(name: str, tfds_name: str, mean, std, data_config, *,
                    unlabeled_split: str | None = None) -> ArrayDataset:
  train_images, train_labels = read_split(tfds_name, "train", data_config)
  test_images, test_labels = read_split(tfds_name, "test", data_config)
  extra = read_split(tfds_name, unlabeled_split, data_config)[0] if unlabeled_split else None
  return ArrayDataset(name=name, num_classes=num_classes(name), train_images=train_images, train_labels=train_labels,
                      test_images=test_images, test_labels=test_labels, mean=mean, std=std,
                      extra_unlabeled_images=extra)


@register("cifar10", num_classes=10)
def load_cifar10(data_config) -> ArrayDataset:
  return _labeled_source("cifar10", TFDS_NAMES["cifar10"], CIFAR10_MEAN, CIFAR10_STD, data_config)


@register("cifar100", num_classes=100)
def load_cifar100(data_config) -> ArrayDataset:
  return _labeled_source("cifar100", TFDS_NAMES["cifar100"], CIFAR100_MEAN, CIFAR100_STD, data_config)


@register("svhn", num_classes=10)
def load_svhn(data_config) -> ArrayDataset:
  # The core `train` split only (73,257 digits); the `extra` split is not part of the SVHN-LT benchmark.
  return _labeled_source("svhn", TFDS_NAMES["svhn"], SVHN_MEAN, SVHN_STD, data_config)


@register("stl10", num_classes=10)
def load_stl10(data_config) -> ArrayDataset:
  # The 5,000 labeled `train` images are the pool of the long-tailed labeled set; the 100,000 `unlabelled`
  # images (unknown class distribution) are the unlabeled set. Normalised with CIFAR-10's statistics, as in the
  # reference.
  return _labeled_source("stl10", TFDS_NAMES["stl10"], CIFAR10_MEAN, CIFAR10_STD, data_config,
                         unlabeled_split="unlabelled")


def imagenet127_super_classes(path: pathlib.Path | str | None = None) -> dict[str, int]:
  """Maps each of the 1000 ImageNet WordNet ids to its ImageNet-127 super-class index in [0, 127).

  Reads `path` (default IMAGENET127_CLASSES_FILE). The index is the super-class's line in the source's
  127-class list (see the file header), before the frequency renumbering that the loaders apply.
  """
  path = pathlib.Path(path or IMAGENET127_CLASSES_FILE)
  if not path.is_file():
    raise ValueError(f"the ImageNet-127 class grouping file {path} is missing; it ships with semi_jax "
                     "(semi_jax/datasets/imagenet127_classes.txt): reinstall the package or restore the file.")
  mapping: dict[str, int] = {}
  super_wnid: dict[int, str] = {}
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip() or line.startswith("#"):
      continue
    fields = line.split(maxsplit=3)
    if len(fields) < 3 or not fields[1].isdigit():
      raise ValueError(f"{path}:{number}: expected 'imagenet_wnid super_index super_wnid super_name', got {line!r}.")
    wnid, index, parent = fields[0], int(fields[1]), fields[2]
    if wnid in mapping:
      raise ValueError(f"{path}:{number}: ImageNet class {wnid} is listed twice.")
    if super_wnid.setdefault(index, parent) != parent:
      raise ValueError(f"{path}:{number}: super-class {index} is {parent} here but {super_wnid[index]} above.")
    mapping[wnid] = index
  if len(mapping) != 1000 or sorted(super_wnid) != list(range(IMAGENET127_NUM_CLASSES)):
    raise ValueError(f"{path}: expected 1000 ImageNet classes in {IMAGENET127_NUM_CLASSES} super-classes, got "
                     f"{len(mapping)} classes in {len(super_wnid)} super-classes.")
  return mapping


def _imagenet127(size: int, data_config) -> ArrayDataset:
  import tensorflow_datasets as tfds
  super_of = imagenet127_super_classes()
  tfds_name = TFDS_NAMES[f"imagenet127_{size}"]
  train_images, train_raw = read_split(tfds_name, "train", data_config)
  test_images, test_raw = read_split(tfds_name, "validation", data_config)
  # The TFDS label order is that of the downsampled-ImageNet files, not the sorted WordNet ids: map by name.
  wnids = tfds.builder(tfds_name, data_dir=data_dir_of(data_config)).info.features["label"].names
  unknown = sorted(set(wnids) - set(super_of))
  if unknown:
    raise ValueError(f"{tfds_name}: classes {unknown[:5]} are missing from the ImageNet-127 grouping "
                     f"{IMAGENET127_CLASSES_FILE}.")
  to_super = np.array([super_of[w] for w in wnids], np.int64)
  # Renumber head to tail by training-set size (ties keep the source order), as the reference does.
  sizes = np.bincount(to_super[train_raw], minlength=IMAGENET127_NUM_CLASSES)
  rank = np.empty(IMAGENET127_NUM_CLASSES, np.int64)
  rank[np.argsort(-sizes, kind="stable")] = np.arange(IMAGENET127_NUM_CLASSES)
  to_class = rank[to_super]
  return ArrayDataset(name=f"imagenet127_{size}", num_classes=IMAGENET127_NUM_CLASSES,
                      train_images=train_images, train_labels=to_class[train_raw],
                      test_images=test_images, test_labels=to_class[test_raw],
                      mean=IMAGENET127_MEAN, std=IMAGENET127_STD)


@register("imagenet127_32", num_classes=IMAGENET127_NUM_CLASSES)
def load_imagenet127_32(data_config) -> ArrayDataset:
  return _imagenet127(32, data_config)


@register("imagenet127_64", num_classes=IMAGENET127_NUM_CLASSES)
def load_imagenet127_64(data_config) -> ArrayDataset:
  return _imagenet127(64, data_config)
