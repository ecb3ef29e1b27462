"""The embedded default data set: the UCI 8x8 handwritten digits that scikit-learn ships (1,797 images).

Real images that need no download, so a first run works offline. The 8x8 grey images (values 0..16) are
scaled to 0..255, resized bilinearly to `data.image_size` and repeated over three channels so every
augmentation and the model see the same RGB layout as CIFAR. A balanced test split of
`data.test_per_class` images per class is held out with a fixed seed; the rest is the training pool.
"""
from __future__ import annotations

import numpy as np

from semi_jax.datasets import ArrayDataset, register

NUM_CLASSES = 10


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # ships the data inside the package: no download
  digits = load_digits()
  return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _to_rgb_uint8(images: np.ndarray, size: int) -> np.ndarray:
  import tensorflow as tf
  x = images[..., None] * (255.0 / 16.0)
  if size != images.shape[1]:
    x = tf.image.resize(x, (size, size), method="bilinear").numpy()
  x = np.clip(np.round(x), 0, 255).astype(np.uint8)
  return np.repeat(x, 3, axis=-1)


@register("digits", num_classes=NUM_CLASSES)
def load_digits_dataset(data_config) -> ArrayDataset:
  images, labels = _load_raw()
  per_class = int(data_config.test_per_class)
  rng = np.random.default_rng(20240601)  # fixed: the test split never depends on the run's seed
  test_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                             for c in range(NUM_CLASSES)])
  train_mask = np.ones(len(labels), bool)
  train_mask[test_idx] = False
  rgb = _to_rgb_uint8(images, int(data_config.image_size))
  scaled = rgb[train_mask].astype(np.float64) / 255.0
  mean = tuple(float(m) for m in scaled.mean(axis=(0, 1, 2)))
  std = tuple(float(s) for s in scaled.std(axis=(0, 1, 2)))
  return ArrayDataset(
      name="digits", num_classes=NUM_CLASSES,
      train_images=rgb[train_mask], train_labels=labels[train_mask],
      test_images=rgb[np.sort(test_idx)], test_labels=labels[np.sort(test_idx)],
      mean=mean, std=std)
