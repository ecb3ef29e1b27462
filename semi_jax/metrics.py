"""Training metrics merged on device (clu) and test-set summaries computed from confusion matrices."""
from __future__ import annotations

import numpy as np
from clu import metrics as clu_metrics


def train_metrics_collection(keys):
  """A clu Collection averaging every scalar the train step reports (keys fixed at trace time)."""
  return clu_metrics.Collection.create(**{k: clu_metrics.Average.from_output(k) for k in sorted(keys)})


def shot_groups(labeled_counts, many_threshold: int, few_threshold: int) -> dict[str, np.ndarray]:
  """Classes by labeled count: many (> many_threshold), few (< few_threshold), medium otherwise."""
  counts = np.asarray(labeled_counts)
  many = counts > many_threshold
  few = counts < few_threshold
  return {"many": many, "medium": ~many & ~few, "few": few}


def summarize_confusion(confusion: np.ndarray, groups: dict[str, np.ndarray]) -> dict:
  """From a [C, C] confusion matrix (rows: true class, columns: prediction), in %: top-1, per-class, balanced and
  many/medium/few accuracy, the geometric mean of the per-class recalls (gm: 0 as soon as one class is never
  recognised), and macro precision, recall and F1 over the classes present in the test set (a class never
  predicted has precision 0, as sklearn's zero_division=0)."""
  confusion = np.asarray(confusion, np.float64)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  correct = np.diag(confusion)
  per_class = np.where(support > 0, correct / np.maximum(support, 1), np.nan) * 100.0
  present = support > 0
  recall = correct[present] / support[present]
  precision = np.where(predicted[present] > 0, correct[present] / np.maximum(predicted[present], 1), 0.0)
  f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
  nan = float("nan")
  out = {"acc": 100.0 * correct.sum() / max(support.sum(), 1.0),
         "balanced_acc": float(np.nanmean(per_class)) if present.any() else nan,
         "gm": float(100.0 * np.exp(np.mean(np.log(np.maximum(recall, 1e-300))))) if present.any() else nan,
         "macro_precision": float(100.0 * precision.mean()) if present.any() else nan,
         "macro_recall": float(100.0 * recall.mean()) if present.any() else nan,
         "macro_f1": float(100.0 * f1.mean()) if present.any() else nan,
         "per_class": per_class}
  if present.any() and recall.min() == 0:
    out["gm"] = 0.0
  for name, members in groups.items():
    sel = members & present
    out[f"acc_{name}"] = float(np.mean(per_class[sel])) if sel.any() else float("nan")
  return out


def format_table(per_class: dict[str, np.ndarray], labeled_counts, unlabeled_counts=None) -> str:
  """A plain-text per-class accuracy table, one column per head."""
  heads = list(per_class)
  header = f"{'class':>5} {'labeled':>8} {'unlabeled':>9} " + " ".join(f"{h:>10}" for h in heads)
  lines = [header, "-" * len(header)]
  for c in range(len(labeled_counts)):
    ul = "?" if unlabeled_counts is None else str(int(unlabeled_counts[c]))
    accs = " ".join(f"{per_class[h][c]:10.2f}" for h in heads)
    lines.append(f"{c:>5} {int(labeled_counts[c]):>8} {ul:>9} {accs}")
  return "\n".join(lines)
