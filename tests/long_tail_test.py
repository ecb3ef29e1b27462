"""Long-tailed class counts, labeled/unlabeled splits, and the per-source split rule of `datasets.splits`."""
import numpy as np
import pytest

from configs import default
from semi_jax import long_tail
from semi_jax.datasets import ArrayDataset, splits


def test_class_counts_cifar10_worked_by_hand():
  # n_c = int(1500 * 100 ** (-c / 9)); 100 ** (-1/9) = 10 ** (-2/9) = 0.599484...
  #   c=1: 1500 * 0.599484 = 899.23 -> 899      c=5: 1500 * 0.0774264 = 116.14 -> 116
  #   c=2: 1500 * 0.359381 = 539.07 -> 539      c=6: 1500 * 0.0464159 =  69.62 ->  69
  #   c=3: 1500 * 0.215443 = 323.16 -> 323      c=7: 1500 * 0.0278256 =  41.74 ->  41
  #   c=4: 1500 * 0.129155 = 193.73 -> 193      c=8: 1500 * 0.0166810 =  25.02 ->  25
  #   c=9 (last, exact): int(1500 / 100) = 15
  assert long_tail.class_counts(1500, 100, 10) == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]


def test_class_counts_cifar100_and_stl10_settings():
  counts = long_tail.class_counts(150, 10, 100)
  expected = [int(150 * 10 ** (-c / 99)) for c in range(99)] + [15]
  assert counts == expected
  assert long_tail.class_counts(450, 10, 10)[-1] == 45
  assert counts == sorted(counts, reverse=True)


def test_class_counts_balanced_when_gamma_is_one():
  assert long_tail.class_counts(37, 1.0, 6) == [37] * 6


@pytest.mark.parametrize("n_max,gamma,num_classes", [(150, 10.0, 100), (100, 4.0, 10), (100, 50.0, 127),
                                                     (3000, 100.0, 10), (300, 2.0, 100)])
def test_last_class_is_exactly_n_over_gamma(n_max, gamma, num_classes):
  # Multiplying the per-class ratio (1/gamma)**(1/(C-1)) C-1 times lands just below n/gamma for these cases
  # (e.g. 150 -> 14 instead of 15 for CIFAR-100-LT), which is why the last class is defined exactly.
  counts = long_tail.class_counts(n_max, gamma, num_classes)
  assert counts[-1] == int(n_max / gamma)
  assert counts[0] == n_max


def test_class_counts_rejects_bad_arguments():
  with pytest.raises(ValueError, match="gamma"):
    long_tail.class_counts(100, 0.5, 10)
  with pytest.raises(ValueError, match="head-class"):
    long_tail.class_counts(0, 10, 10)
  with pytest.raises(ValueError, match="num_classes"):
    long_tail.class_counts(10, 10, 0)


def test_unlabeled_counts_distributions():
  consistent = long_tail.unlabeled_counts(3000, 100, 10, "consistent")
  assert consistent == long_tail.class_counts(3000, 100, 10)
  assert consistent[0] == 3000 and consistent[-1] == 30
  assert long_tail.unlabeled_counts(3000, 100, 10, "uniform") == [3000] * 10
  assert long_tail.unlabeled_counts(3000, 100, 10, "reversed") == consistent[::-1]
  with pytest.raises(ValueError, match="unknown unlabeled distribution"):
    long_tail.unlabeled_counts(3000, 100, 10, "shuffled")


def _pool(sizes, seed=0):
  """Labels of a shuffled pool with `sizes[c]` examples of class c."""
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
  return np.random.default_rng(seed).permutation(labels)


def test_split_exact_counts_disjoint_and_deterministic():
  labels = _pool([40, 30, 20, 10])
  lab_counts, unl_counts = [10, 6, 3, 1], [25, 20, 8, 2]
  labeled, unlabeled = long_tail.split(labels, 4, labeled_counts=lab_counts, unlabeled_counts=unl_counts, seed=3)
  assert np.bincount(labels[labeled], minlength=4).tolist() == lab_counts
  assert np.bincount(labels[unlabeled], minlength=4).tolist() == unl_counts
  assert not set(labeled.tolist()) & set(unlabeled.tolist())
  assert len(set(labeled.tolist())) == len(labeled) and len(set(unlabeled.tolist())) == len(unlabeled)
  assert np.all(np.diff(labeled) > 0) and np.all(np.diff(unlabeled) > 0)
  again = long_tail.split(labels, 4, labeled_counts=lab_counts, unlabeled_counts=unl_counts, seed=3)
  np.testing.assert_array_equal(again[0], labeled)
  np.testing.assert_array_equal(again[1], unlabeled)
  other = long_tail.split(labels, 4, labeled_counts=lab_counts, unlabeled_counts=unl_counts, seed=4)
  assert not np.array_equal(other[0], labeled)


def test_split_without_unlabeled_draw():
  labels = _pool([12, 8, 5])
  labeled, unlabeled = long_tail.split(labels, 3, labeled_counts=[12, 4, 1], unlabeled_counts=None, seed=0)
  assert np.bincount(labels[labeled], minlength=3).tolist() == [12, 4, 1]
  assert unlabeled.size == 0


def test_split_too_few_images_is_a_clear_error():
  labels = _pool([10, 10, 3])
  with pytest.raises(ValueError, match=r"class 2 has 3 training images .* 2 labeled \+ 2 unlabeled.*labeled_max"):
    long_tail.split(labels, 3, labeled_counts=[5, 4, 2], unlabeled_counts=[5, 4, 2], seed=0, dataset="toy")


def _dataset(sizes, *, extra=None, seed=0):
  labels = _pool(sizes, seed)
  images = np.zeros((len(labels), 4, 4, 3), np.uint8)
  return ArrayDataset(name="toy", num_classes=len(sizes), train_images=images, train_labels=labels,
                      test_images=images[:2], test_labels=labels[:2], mean=(0.5,) * 3, std=(0.25,) * 3,
                      extra_unlabeled_images=extra)


def test_labeled_unlabeled_indices_fraction_mode():
  ds = _dataset([50, 30, 14, 6])
  data = default.get_config().data
  data.labeled_fraction = 0.1
  labeled, unlabeled = splits.labeled_unlabeled_indices(ds, data, seed=1)
  # round(0.1 * n): 5.0 -> 5, 3.0 -> 3, 1.4 -> 1, 0.6 -> 1; every other image of the class is unlabeled.
  assert np.bincount(ds.train_labels[labeled], minlength=4).tolist() == [5, 3, 1, 1]
  assert np.bincount(ds.train_labels[unlabeled], minlength=4).tolist() == [45, 27, 13, 5]
  assert sorted(labeled.tolist() + unlabeled.tolist()) == list(range(len(ds.train_labels)))
  assert labeled.dtype == np.int64 and unlabeled.dtype == np.int64
  np.testing.assert_array_equal(splits.labeled_unlabeled_indices(ds, data, seed=1)[0], labeled)
  assert not np.array_equal(splits.labeled_unlabeled_indices(ds, data, seed=2)[0], labeled)


def test_labeled_unlabeled_indices_long_tail_mode():
  ds = _dataset([60, 60, 60, 60])
  data = default.get_config().data
  data.labeled_max, data.labeled_imb = 20, 10.0
  data.unlabeled_max, data.unlabeled_imb, data.unlabeled_dist = 30, 10.0, "reversed"
  labeled, unlabeled = splits.labeled_unlabeled_indices(ds, data, seed=0)
  # 20 * 10 ** (-c/3): 20, 9.28 -> 9, 4.30 -> 4, last exactly 2; unlabeled 30, 13, 6, 3 reversed.
  assert np.bincount(ds.train_labels[labeled], minlength=4).tolist() == [20, 9, 4, 2]
  assert np.bincount(ds.train_labels[unlabeled], minlength=4).tolist() == [3, 6, 13, 30]
  assert not set(labeled.tolist()) & set(unlabeled.tolist())


def test_labeled_unlabeled_indices_with_extra_unlabeled_set():
  extra = np.zeros((7, 4, 4, 3), np.uint8)
  ds = _dataset([30, 30, 30], extra=extra)
  data = default.get_config().data
  data.labeled_max, data.labeled_imb = 30, 10.0
  labeled, unlabeled = splits.labeled_unlabeled_indices(ds, data, seed=0)
  assert np.bincount(ds.train_labels[labeled], minlength=3).tolist() == long_tail.class_counts(30, 10.0, 3)
  assert unlabeled.size == 0 and unlabeled.dtype == np.int64
  data.labeled_fraction = 0.5  # fraction mode with an external unlabeled set: the rest of the pool is unused
  labeled, unlabeled = splits.labeled_unlabeled_indices(ds, data, seed=0)
  assert np.bincount(ds.train_labels[labeled], minlength=3).tolist() == [15, 15, 15]
  assert unlabeled.size == 0


def test_labeled_unlabeled_indices_refuses_a_class_without_labeled_images():
  data = default.get_config().data
  data.labeled_fraction = 0.1  # round(0.1 * 4) = 0 images of class 2; 0.5 / 4 = 0.125 is the bound
  with pytest.raises(ValueError, match=r"no image of class 2: round\(4 \* 0.1\) = 0; "
                                       r"raise data.labeled_fraction above 0.125"):
    splits.labeled_unlabeled_indices(_dataset([50, 30, 4]), data, seed=0)
  with pytest.raises(ValueError, match=r"2 classes \(1, ...\): round\(3 \* 0.1\) = 0; .* above 0.1667"):
    splits.labeled_unlabeled_indices(_dataset([50, 4, 3]), data, seed=0)
  data.labeled_fraction = 0.13  # 0.52 rounds to 1: accepted
  labeled, _ = splits.labeled_unlabeled_indices(_dataset([50, 30, 4]), data, seed=0)
  assert np.bincount(_dataset([50, 30, 4]).train_labels[labeled], minlength=3).tolist() == [6, 4, 1]
  data.labeled_fraction = 0.0  # long-tail counts 5 * 10 ** (-c / 2): 5, 1, 0
  data.labeled_max, data.labeled_imb, data.unlabeled_max = 5, 10.0, 5
  with pytest.raises(ValueError, match=r"no image of class 2: lower data.labeled_imb or raise data.labeled_max"):
    splits.labeled_unlabeled_indices(_dataset([20, 20, 20]), data, seed=0)


def test_labeled_unlabeled_indices_bad_fraction():
  data = default.get_config().data
  data.labeled_fraction = 1.0
  with pytest.raises(ValueError, match=r"labeled_fraction must be in \[0, 1\)"):
    splits.labeled_unlabeled_indices(_dataset([10, 10]), data, seed=0)


def test_labeled_unlabeled_indices_on_digits():
  from semi_jax import datasets
  from configs import test as test_config
  config = test_config.get_config()
  ds = datasets.load(config.data)
  labeled, unlabeled = splits.labeled_unlabeled_indices(ds, config.data, seed=config.seed)
  d = config.data
  assert np.bincount(ds.train_labels[labeled], minlength=10).tolist() == long_tail.class_counts(
      d.labeled_max, d.labeled_imb, 10)
  assert np.bincount(ds.train_labels[unlabeled], minlength=10).tolist() == long_tail.unlabeled_counts(
      d.unlabeled_max, d.unlabeled_imb, 10, d.unlabeled_dist)
  assert not set(labeled.tolist()) & set(unlabeled.tolist())
