"""Which training-pool images are labeled and which are unlabeled, for every data source.

Two regimes, chosen by the data config:
- `data.labeled_fraction > 0` (ImageNet-127): every class keeps its natural size; `round(n_c * fraction)` of its
  images are labeled and the rest of the class is unlabeled.
- otherwise (CIFAR-LT, SVHN-LT, STL-10-LT, digits): the long tail of `semi_jax.long_tail`, with the labeled
  counts from `data.labeled_max` / `data.labeled_imb` and the unlabeled counts from `data.unlabeled_max` /
  `data.unlabeled_imb` / `data.unlabeled_dist`.
A source with its own unlabeled set (`ArrayDataset.extra_unlabeled_images`, e.g. STL-10) draws no unlabeled
images from the pool. The result depends only on the labels, the config and the seed, so every process of a
multi-host job computes the same split.
"""
from __future__ import annotations

import numpy as np

from semi_jax import long_tail
from semi_jax.datasets import ArrayDataset


VALIDATION_STREAM = 0x7A11D  # the validation draw's own random stream: the split's draws are not shifted by it


def validation_indices(ds: ArrayDataset, per_class: int, seed: int) -> np.ndarray:
  """Sorted int64 indices into `ds.train_images` of a class-balanced validation set: `per_class` labeled
  training images of every class, drawn with the seed before the labeled/unlabeled split (which never sees
  them). Empty for per_class = 0."""
  labels = np.asarray(ds.train_labels)
  if per_class <= 0:
    return np.zeros((0,), np.int64)
  rng = np.random.default_rng([seed, VALIDATION_STREAM])
  chosen = []
  for c in range(ds.num_classes):
    pool = np.flatnonzero(labels == c)
    if per_class > len(pool):
      raise ValueError(f"{ds.name}: class {c} has {len(pool)} training images, fewer than "
                       f"data.val_per_class={per_class}; lower data.val_per_class.")
    chosen.append(rng.permutation(pool)[:per_class])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def labeled_unlabeled_indices(ds: ArrayDataset, data_config, seed: int,
                              exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns sorted int64 indices into `ds.train_images`: (labeled, unlabeled), disjoint, and disjoint from
  `exclude` (the validation set).

  The unlabeled indices are empty when `ds.extra_unlabeled_images` is the unlabeled set.
  """
  labels = np.asarray(ds.train_labels)
  num_classes = ds.num_classes
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{ds.name}: training labels must lie in [0, {num_classes}), "
                     f"got [{labels.min()}, {labels.max()}].")
  if exclude is not None and len(exclude):
    labels = labels.copy()
    labels[exclude] = -1  # in no class's pool
  from_pool = ds.extra_unlabeled_images is None
  fraction = float(data_config.labeled_fraction)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.labeled_fraction must be in [0, 1) (0 = long-tailed counts from data.labeled_max), "
                     f"got {fraction}.")
  if fraction > 0:
    class_sizes = np.bincount(labels[labels >= 0], minlength=num_classes)
    # Round half to even, as numpy does: the CISSL ImageNet-127 split labels round(0.1 * n_c) per class.
    labeled_counts = [int(np.round(n * fraction)) for n in class_sizes]
    unlabeled_counts = [int(n) - l for n, l in zip(class_sizes, labeled_counts)] if from_pool else None
  else:
    labeled_counts = long_tail.class_counts(int(data_config.labeled_max), float(data_config.labeled_imb),
                                            num_classes)
    unlabeled_counts = None
    if from_pool:
      unlabeled_counts = long_tail.unlabeled_counts(int(data_config.unlabeled_max),
                                                    float(data_config.unlabeled_imb), num_classes,
                                                    str(data_config.unlabeled_dist))
  held_out = 0 if exclude is None else len(exclude)
  name = ds.name if not held_out else f"{ds.name} (without its {held_out} validation images)"
  _check_every_class_labeled(labeled_counts, labels, fraction, name)
  labeled, unlabeled = long_tail.split(labels, num_classes, labeled_counts=labeled_counts,
                                       unlabeled_counts=unlabeled_counts, seed=seed, dataset=name)
  if from_pool and unlabeled.size == 0:
    raise ValueError(f"{ds.name}: the split leaves no unlabeled images; lower data.labeled_fraction or raise "
                     "data.unlabeled_max.")
  return labeled.astype(np.int64), unlabeled.astype(np.int64)


def _check_every_class_labeled(labeled_counts, labels: np.ndarray, fraction: float, name: str) -> None:
  """Refuses a split that labels no image of some class. The labeled class prior would have a zero there: the
  logit-adjusted heads subtract tau * log(prior), and the balanced head collapses onto that class."""
  empty = [c for c, n in enumerate(labeled_counts) if n < 1]
  if not empty:
    return
  which = f"class {empty[0]}" if len(empty) == 1 else f"{len(empty)} classes ({empty[0]}, ...)"
  if fraction > 0:
    smallest = int(min((labels == c).sum() for c in empty))
    fix = (f"{which} has no training image" if smallest == 0 else
           f"round({smallest} * {fraction}) = 0; raise data.labeled_fraction above {0.5 / smallest:.4g}")
  else:
    fix = "lower data.labeled_imb or raise data.labeled_max until int(labeled_max / labeled_imb) >= 1"
  raise ValueError(f"{name}: the split labels no image of {which}: {fix}. Every class needs at least one "
                   "labeled image.")
