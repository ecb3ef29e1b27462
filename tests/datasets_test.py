"""Data sources: TFDS loaders on offline mock data, the missing-data errors, ImageNet-127 labels, digits."""
import importlib
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from semi_jax import datasets, long_tail
from semi_jax.datasets import splits, tfds_sources

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
TFDS_SOURCES = {"cifar10", "cifar100", "svhn", "stl10", "imagenet127_32", "imagenet127_64"}


def _mock(num_examples=40, as_dataset_fn=None):
  """Offline TFDS: records in the data set's real format (random content), generated from the builder code."""
  return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE,
                                as_dataset_fn=as_dataset_fn)


def _data_config(name, image_size=32, data_dir=""):
  data = default.get_config().data
  data.name, data.image_size, data.data_dir = name, image_size, data_dir
  return data


def test_every_tfds_source_is_registered():
  assert TFDS_SOURCES <= set(datasets.names())


@pytest.mark.parametrize("name,size,num_classes,mean,std,has_extra", [
    ("cifar10", 32, 10, tfds_sources.CIFAR10_MEAN, tfds_sources.CIFAR10_STD, False),
    ("cifar100", 32, 100, tfds_sources.CIFAR100_MEAN, tfds_sources.CIFAR100_STD, False),
    ("svhn", 32, 10, tfds_sources.SVHN_MEAN, tfds_sources.SVHN_STD, False),
    ("stl10", 32, 10, tfds_sources.CIFAR10_MEAN, tfds_sources.CIFAR10_STD, True),
    ("imagenet127_32", 32, 127, tfds_sources.IMAGENET127_MEAN, tfds_sources.IMAGENET127_STD, False),
    ("imagenet127_64", 64, 127, tfds_sources.IMAGENET127_MEAN, tfds_sources.IMAGENET127_STD, False),
])
def test_tfds_loader_on_mock_data(name, size, num_classes, mean, std, has_extra):
  with _mock(40):
    ds = datasets.load(_data_config(name, size))
  assert ds.name == name and ds.num_classes == num_classes
  assert ds.mean == mean and ds.std == std
  for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
    assert images.shape == (40, size, size, 3) and images.dtype == np.uint8
    assert labels.shape == (40,) and labels.dtype == np.int64
    assert 0 <= labels.min() and labels.max() < num_classes
  assert images.std() > 0  # real (random) pixels came through, not a zero fill
  assert datasets.is_aligned(ds.train_images)  # the input pipeline reads it in place
  if has_extra:
    assert ds.extra_unlabeled_images.shape == (40, size, size, 3)
    assert ds.extra_unlabeled_images.dtype == np.uint8
    assert datasets.is_aligned(ds.extra_unlabeled_images)
  else:
    assert ds.extra_unlabeled_images is None


def _colour_records(shape, num_examples, num_labels, label_fn=lambda i: i):
  """A `_as_dataset` replacement: image i is the solid colour (i, 2i, 3i) mod 256, label label_fn(i)."""
  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, decoders, read_config, shuffle_files
    index = tf.range(num_examples, dtype=tf.int64)
    colours = tf.cast(tf.stack([index, 2 * index, 3 * index], axis=1) % 256, tf.uint8)
    images = tf.broadcast_to(colours[:, None, None, :], (num_examples, *shape))
    labels = tf.constant([label_fn(i) % num_labels for i in range(num_examples)], tf.int64)
    if split == "validation":  # a different label sequence for the held-out split
      labels = tf.reverse(labels, [0])
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  return as_dataset


def test_stl10_images_resized_in_order_with_unlabelled_split():
  n = 300
  with _mock(as_dataset_fn=_colour_records((96, 96, 3), n, 10)):
    ds = datasets.load(_data_config("stl10", 32))
  expected = np.stack([np.arange(n), 2 * np.arange(n), 3 * np.arange(n)], axis=1) % 256
  for images in (ds.train_images, ds.test_images, ds.extra_unlabeled_images):
    assert images.shape == (n, 32, 32, 3)
    # A bilinear resize keeps a solid colour; the order and the labels pass through untouched.
    np.testing.assert_array_equal(images, np.broadcast_to(expected[:, None, None, :], images.shape))
  np.testing.assert_array_equal(ds.train_labels, np.arange(n) % 10)


def test_read_split_makes_grey_images_rgb_and_resizes():
  with _mock(12):
    images, labels = tfds_sources.read_split("mnist", "train", _data_config("mnist", 32))
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (12,)
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  np.testing.assert_array_equal(images[..., 0], images[..., 2])


def _grouping_table():
  """The grouping file read with plain string operations: {wnid: (super_index, super_wnid)}."""
  table = {}
  for line in tfds_sources.IMAGENET127_CLASSES_FILE.read_text().splitlines():
    if line and not line.startswith("#"):
      wnid, index, parent = line.split()[:3]
      table[wnid] = (int(index), parent)
  return table


def test_imagenet127_grouping_file():
  super_of = tfds_sources.imagenet127_super_classes()
  table = _grouping_table()
  assert super_of == {w: index for w, (index, _) in table.items()}
  assert len(super_of) == 1000 and set(super_of.values()) == set(range(127))
  # Every TFDS imagenet_resized class is covered (its label order differs from the sorted WordNet ids).
  wnids = tfds.builder("imagenet_resized/32x32").info.features["label"].names
  assert sorted(wnids) == sorted(super_of) and wnids != sorted(wnids)
  # Spot checks against WordNet: the super-class is an ancestor of the class.
  assert table["n01440764"][1] == "n01428580"  # tench -> soft-finned fish
  assert table["n02085620"][1] == "n01861778"  # Chihuahua -> mammal
  assert table["n02219486"][1] == table["n01770081"][1] == "n01767661"  # ant, harvestman -> arthropod
  assert table["n12267677"][1] == "n13134947"  # acorn -> fruit
  assert table["n07684084"] == (0, "n07683786")  # French loaf -> loaf of bread, the first super-class
  # One super-class per index, 127 of them.
  assert len({parent for _, parent in table.values()}) == 127


def test_imagenet127_labels_follow_the_grouping_head_to_tail():
  n = 3000
  # Raw ImageNet labels i**2 mod 1000: an uneven mix of classes, so the super-class sizes differ.
  with _mock(as_dataset_fn=_colour_records((32, 32, 3), n, 1000, label_fn=lambda i: i * i)):
    ds = datasets.load(_data_config("imagenet127_32", 32))
  wnids = tfds.builder("imagenet_resized/32x32").info.features["label"].names
  table = _grouping_table()
  raw_train = np.array([(i * i) % 1000 for i in range(n)])
  raw_test = raw_train[::-1]
  super_train = np.array([table[wnids[r]][0] for r in raw_train])
  super_test = np.array([table[wnids[r]][0] for r in raw_test])
  # Independent renumbering: sort super-classes by training count, largest first, ties by source index.
  sizes = {k: int((super_train == k).sum()) for k in range(127)}
  order = sorted(range(127), key=lambda k: (-sizes[k], k))
  new_index = {k: position for position, k in enumerate(order)}
  np.testing.assert_array_equal(ds.train_labels, [new_index[k] for k in super_train])
  np.testing.assert_array_equal(ds.test_labels, [new_index[k] for k in super_test])
  assert 0 <= ds.train_labels.min() and ds.train_labels.max() < 127
  counts = np.bincount(ds.train_labels, minlength=127)
  assert np.all(np.diff(counts) <= 0)  # class 0 is the head


def test_imagenet127_missing_grouping_file(monkeypatch, tmp_path):
  monkeypatch.setattr(tfds_sources, "IMAGENET127_CLASSES_FILE", tmp_path / "imagenet127_classes.txt")
  with pytest.raises(ValueError, match="ImageNet-127 class grouping file .*imagenet127_classes.txt is missing"):
    datasets.load(_data_config("imagenet127_32", 32, data_dir=str(tmp_path)))


def test_imagenet127_grouping_file_is_validated(tmp_path):
  lines = tfds_sources.IMAGENET127_CLASSES_FILE.read_text().splitlines()
  short = tmp_path / "short.txt"
  short.write_text("\n".join(lines[:-1]) + "\n")  # drops one ImageNet class
  with pytest.raises(ValueError, match="expected 1000 ImageNet classes"):
    tfds_sources.imagenet127_super_classes(short)
  data = [line for line in lines if line and not line.startswith("#")]
  wnid, index, parent, name = data[0].split(maxsplit=3)
  clash = tmp_path / "clash.txt"
  clash.write_text("\n".join(data + [f"n99999999 {index} n00000000 {name}"]) + "\n")
  with pytest.raises(ValueError, match=f"super-class {index} is n00000000 here but {parent}"):
    tfds_sources.imagenet127_super_classes(clash)


def test_missing_data_set_names_tfds_name_directory_and_fix(tmp_path):
  with pytest.raises(ValueError) as error:
    datasets.load(_data_config("cifar10", data_dir=str(tmp_path)))
  message = str(error.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f"python -m semi_jax.tools.prepare_data --dataset=cifar10 --data_dir={tmp_path}" in message


def test_missing_data_set_uses_tfds_data_dir_variable(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert tfds_sources.data_dir_of(_data_config("svhn")) == str(tmp_path)
  with pytest.raises(ValueError, match=re.escape(f"'svhn_cropped' is not prepared in the data directory {tmp_path}")):
    datasets.load(_data_config("svhn"))


def test_missing_imagenet_resized_explains_the_download(tmp_path):
  with pytest.raises(ValueError) as error:
    datasets.load(_data_config("imagenet127_64", 64, data_dir=str(tmp_path)))
  message = str(error.value)
  assert "'imagenet_resized/64x64'" in message and str(tmp_path) in message
  assert "Imagenet64_train_part1_npz.zip" in message and "image-net.org" in message


def test_digits_loader_real_data():
  from sklearn.datasets import load_digits
  data = _data_config("digits", 8)
  data.test_per_class = 10
  ds = datasets.load(data)
  assert ds.num_classes == 10
  assert np.bincount(ds.test_labels, minlength=10).tolist() == [10] * 10
  for images in (ds.train_images, ds.test_images):
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
  # Train and test partition the 1,797 images: together they are exactly the raw set (as a multiset), so no
  # image index is used twice or dropped, and every test image keeps its own label.
  raw = load_digits()
  raw_images = np.round(raw.images.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
  raw_rows = sorted(zip(raw.target.tolist(), (im.tobytes() for im in raw_images)))
  ours = np.concatenate([ds.train_images[..., 0], ds.test_images[..., 0]])
  our_labels = np.concatenate([ds.train_labels, ds.test_labels])
  assert sorted(zip(our_labels.tolist(), (im.tobytes() for im in ours))) == raw_rows
  resized = datasets.load(_data_config("digits", 16))
  assert resized.train_images.shape[1:] == (16, 16, 3) and resized.train_images.dtype == np.uint8


def _tfds_configs():
  cases = []
  for path in sorted(CONFIG_DIR.glob("*.py")):
    if path.stem == "__init__":
      continue
    module = importlib.import_module(f"configs.{path.stem}")
    args = [None] + (["size=64"] if path.stem == "imagenet127" else [])
    for arg in args:
      if module.get_config(arg).data.name in TFDS_SOURCES:
        cases.append(pytest.param(path.stem, arg, id=f"{path.stem}:{arg}" if arg else path.stem))
  return cases


CONFIG_CASES = _tfds_configs()


def test_config_cases_cover_every_benchmark():
  covered = {importlib.import_module(f"configs.{p.values[0]}").get_config(p.values[1]).data.name
             for p in CONFIG_CASES}
  assert covered == TFDS_SOURCES


@pytest.mark.parametrize("module,arg", CONFIG_CASES)
def test_config_data_loads_under_mock(module, arg):
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  # ImageNet-127 merges 1,000 mock classes unevenly: 2,000 images leave some of its classes empty, 8,000 none.
  with _mock(8000 if config.data.labeled_fraction > 0 else 2000):
    ds = datasets.load(config.data)
  assert ds.train_images.shape[1:] == (config.data.image_size,) * 2 + (3,)
  smallest = int(np.bincount(ds.train_labels, minlength=ds.num_classes).min())
  if config.data.labeled_fraction == 0:
    assert smallest >= 3, "the mock must hold a few images of every class"
    # The paper's counts need the real data set; scale them to what the mock holds.
    config.data.labeled_max = config.data.unlabeled_max = smallest // 3
    # ... and keep at least one labeled image in the tail class (splits refuses a class without one).
    config.data.labeled_imb = min(config.data.labeled_imb, config.data.labeled_max)
  else:  # the mock's small classes would round to no labeled image, which splits refuses
    assert smallest >= 1, "the mock must hold an image of every class"
    config.data.labeled_fraction = max(config.data.labeled_fraction, 0.6 / smallest)
  labeled, unlabeled = splits.labeled_unlabeled_indices(ds, config.data, seed=config.seed)
  assert not set(labeled.tolist()) & set(unlabeled.tolist())
  lab_counts = np.bincount(ds.train_labels[labeled], minlength=ds.num_classes)
  if config.data.labeled_fraction > 0:
    sizes = np.bincount(ds.train_labels, minlength=ds.num_classes)
    np.testing.assert_array_equal(lab_counts, np.round(sizes * config.data.labeled_fraction).astype(int))
    assert len(labeled) + len(unlabeled) == len(ds.train_labels)
  else:
    assert lab_counts.tolist() == long_tail.class_counts(config.data.labeled_max, config.data.labeled_imb,
                                                         ds.num_classes)
  if ds.extra_unlabeled_images is not None:
    assert unlabeled.size == 0 and len(ds.extra_unlabeled_images) > 0
