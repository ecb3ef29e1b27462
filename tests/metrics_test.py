"""Test-set summaries from confusion matrices, against hand-computed values and sklearn."""
import numpy as np
import pytest
from sklearn import metrics as skm

from semi_jax import metrics

GROUPS = {"many": np.array([True, False, False, False]), "medium": np.array([False, True, False, False]),
          "few": np.array([False, False, True, True])}


def test_hand_computed_case():
  # Rows: true class, columns: prediction. Class 3 has no test images and is never predicted.
  confusion = np.array([[8, 2, 0, 0], [1, 3, 1, 0], [0, 2, 2, 0], [0, 0, 0, 0]])
  s = metrics.summarize_confusion(confusion, GROUPS)
  assert s["acc"] == pytest.approx(100 * 13 / 19)
  np.testing.assert_allclose(s["per_class"][:3], [80.0, 60.0, 50.0])
  assert np.isnan(s["per_class"][3])
  assert s["balanced_acc"] == pytest.approx(100 * (0.8 + 0.6 + 0.5) / 3)
  assert s["macro_recall"] == pytest.approx(s["balanced_acc"])
  assert s["macro_precision"] == pytest.approx(100 * (8 / 9 + 3 / 7 + 2 / 3) / 3)
  f1 = lambda p, r: 2 * p * r / (p + r)
  assert s["macro_f1"] == pytest.approx(100 * (f1(8 / 9, 0.8) + f1(3 / 7, 0.6) + f1(2 / 3, 0.5)) / 3)
  assert s["gm"] == pytest.approx(100 * (0.8 * 0.6 * 0.5) ** (1 / 3))
  assert (s["acc_many"], s["acc_medium"], s["acc_few"]) == pytest.approx((80.0, 60.0, 50.0))


def test_a_class_never_recognised_zeroes_the_geometric_mean():
  confusion = np.array([[5, 0, 0, 0], [0, 5, 0, 0], [3, 0, 0, 0], [0, 0, 0, 4]])  # class 2: recall 0, never predicted
  s = metrics.summarize_confusion(confusion, GROUPS)
  assert s["gm"] == 0.0 and s["balanced_acc"] == pytest.approx(75.0)
  assert s["macro_precision"] == pytest.approx(100 * (5 / 8 + 1 + 0 + 1) / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_metrics_equal_sklearn(seed):
  rng = np.random.default_rng(seed)
  y_true = rng.integers(0, 4, 200)
  y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))
  confusion = skm.confusion_matrix(y_true, y_pred, labels=range(4))
  s = metrics.summarize_confusion(confusion, GROUPS)
  p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(4), average="macro",
                                                   zero_division=0)
  assert (s["macro_precision"], s["macro_recall"], s["macro_f1"]) == pytest.approx((100 * p, 100 * r, 100 * f))
  assert s["balanced_acc"] == pytest.approx(100 * skm.balanced_accuracy_score(y_true, y_pred))
  recalls = np.diag(confusion) / confusion.sum(axis=1)
  assert s["gm"] == pytest.approx(100 * np.prod(recalls) ** 0.25)
