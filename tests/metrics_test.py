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


def test_pseudo_label_counts_and_summary_by_hand():
  """Six unlabeled rows of 3 classes, one with an unknown label (-1). Confident pseudo-labels: rows 0, 1, 2, 5."""
  import jax.numpy as jnp
  from semi_jax import semi_state
  target = jnp.array([0, 0, 1, 2, 1, 2])
  mask = jnp.array([True, True, True, False, False, True])
  u_label = jnp.array([0, 1, 1, 2, 0, -1])
  counts = {k: np.asarray(v) for k, v in semi_state.pseudo_label_counts(target, mask, u_label, 3).items()}
  np.testing.assert_array_equal(counts["true"], [2, 2, 1])  # known labels: 0, 1, 1, 2, 0
  np.testing.assert_array_equal(counts["confident"], [2, 1, 1])  # rows 0, 1 -> 0; row 2 -> 1; row 5 -> 2
  np.testing.assert_array_equal(counts["confident_known"], [2, 1, 0])  # row 5's label is unknown
  np.testing.assert_array_equal(counts["correct"], [1, 1, 0])  # row 0 (0 = 0), row 2 (1 = 1)
  np.testing.assert_array_equal(counts["confident_of_true"], [1, 2, 0])  # true 0: row 0; true 1: rows 1, 2
  s = metrics.pseudo_label_summary(counts)
  np.testing.assert_allclose(s["precision"][:2], [0.5, 1.0])
  assert np.isnan(s["precision"][2])  # no confident known pseudo-label of class 2
  np.testing.assert_allclose(s["recall"], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(s["mask_rate"], [0.5, 1.0, 0.0])
  np.testing.assert_allclose(s["estimated"], [0.5, 0.25, 0.25])
  np.testing.assert_allclose(s["true"], [0.4, 0.4, 0.2])
  assert s["tv_distance"] == pytest.approx(0.5 * (0.1 + 0.15 + 0.05))
  assert s["macro_precision"] == pytest.approx(0.75) and s["macro_recall"] == pytest.approx(1 / 3)
  assert s["mask_rate_all"] == pytest.approx(3 / 5) and s["confident"] == 4
  unknown = metrics.pseudo_label_summary({k: np.zeros(3) if k != "confident" else np.array([1.0, 0, 3])
                                          for k in counts})
  np.testing.assert_allclose(unknown["estimated"], [0.25, 0, 0.75])
  assert np.isnan(unknown["tv_distance"]) and np.isnan(unknown["macro_recall"])


def test_tensorboard_images():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [0, 2, 2]])
  image = metrics.confusion_image(confusion, cell=4)
  assert image.shape == (12, 12, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[0, 12 - 1], [255, 255, 255])  # row 0, column 2: 0 of 4
  assert (image[0, 0] < image[0, 4]).all()  # 3/4 darker than 1/4
  np.testing.assert_array_equal(image[4:8], 255)  # no examples of class 1: white
  np.testing.assert_array_equal(image[8, 4], image[8, 8])  # 2/4 and 2/4
  bars = metrics.bar_image([100.0, 50.0, float("nan")], width=4, height=10)
  assert bars.shape == (10, 12, 3)
  assert (bars[:, 0] != 255).any(axis=-1).all()  # full bar
  assert (bars[5:, 4] != 255).any(axis=-1).all() and (bars[:5, 4] == 255).all()  # half bar
  assert (bars[:, 8:] == 255).all()  # nan: no bar
