"""Long-tailed labeled / unlabeled splits for class-imbalanced SSL (CISSL).

Class c (0-based, C classes) keeps `int(n_max * gamma ** (-c / (C - 1)))` examples, the last class exactly
`int(n_max / gamma)`. The unlabeled set follows its own maximum and ratio, in the same class order
("consistent"), flat ("uniform") or in reverse order ("reversed"). Every split is a pure function of the labels
and the seed, so every process of a multi-host job computes the same one.
"""
from __future__ import annotations

import numpy as np

DISTRIBUTIONS = ("consistent", "uniform", "reversed")


def class_counts(n_max: int, gamma: float, num_classes: int) -> list[int]:
  """Per-class example counts of a long tail from `n_max` (head class) with imbalance ratio `gamma`."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  if gamma < 1:
    raise ValueError(f"imbalance ratio gamma must be >= 1 (1 = balanced), got {gamma}.")
  if n_max < 1:
    raise ValueError(f"the head-class count must be >= 1, got {n_max}.")
  if num_classes == 1:
    return [int(n_max)]
  counts = [int(n_max * np.power(1.0 / gamma, c / (num_classes - 1))) for c in range(num_classes - 1)]
  counts.append(int(n_max / gamma))
  return counts


def unlabeled_counts(m_max: int, gamma_u: float, num_classes: int, distribution: str) -> list[int]:
  """Per-class unlabeled counts for a `distribution` in DISTRIBUTIONS."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"unknown unlabeled distribution {distribution!r}; choose one of {DISTRIBUTIONS}.")
  if distribution == "uniform":
    return class_counts(m_max, 1.0, num_classes)
  counts = class_counts(m_max, gamma_u, num_classes)
  return counts[::-1] if distribution == "reversed" else counts


def split(labels: np.ndarray, num_classes: int, *, labeled_counts: list[int],
          unlabeled_counts: list[int] | None, seed: int,
          dataset: str = "the data set") -> tuple[np.ndarray, np.ndarray]:
  """Draws disjoint labeled and unlabeled index sets with exact per-class counts.

  Args:
    labels: [N] int class of every pool example.
    labeled_counts / unlabeled_counts: examples to draw per class; `unlabeled_counts=None` draws no unlabeled
      set from the pool (an external unlabeled set is used instead, e.g. STL-10's).
    seed: the split depends on nothing else.
  Returns:
    (labeled_idx, unlabeled_idx), sorted int64 index arrays into `labels`.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  labeled, unlabeled = [], []
  for c in range(num_classes):
    pool = np.flatnonzero(labels == c)
    need_l = labeled_counts[c]
    need_u = 0 if unlabeled_counts is None else unlabeled_counts[c]
    if need_l + need_u > len(pool):
      raise ValueError(
          f"{dataset}: class {c} has {len(pool)} training images but the split asks for {need_l} labeled + "
          f"{need_u} unlabeled. Lower the head-class counts (data.labeled_max / data.unlabeled_max) or the "
          "imbalance ratios.")
    order = rng.permutation(pool)
    labeled.append(order[:need_l])
    unlabeled.append(order[need_l:need_l + need_u])
  return np.sort(np.concatenate(labeled)), np.sort(np.concatenate(unlabeled))
