"""Training metrics merged on device (clu), test-set summaries computed from confusion matrices, and the
evaluation records of a run (eval.jsonl): reading them and selecting one by validation accuracy."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from absl import logging

from semi_jax import files


def train_metrics_collection(keys):
  """A clu Collection averaging every scalar the train step reports (keys fixed at trace time)."""
  from clu import metrics as clu_metrics  # here: the report reads summaries without loading JAX
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


def select_by_validation(records) -> int | None:
  """The index of the evaluation record with the highest validation balanced accuracy of the reported head, or
  None when the records hold no validation results: model selection that never looks at the test set. Among
  equal scores the last evaluation wins: a small validation set ties often (50 digits images score in steps of
  2 %), and the later model has trained longer."""
  scores = [r["validation"][r["reported"]]["balanced_acc"] if "validation" in r else None for r in records]
  if not scores or any(v is None for v in scores):
    return None
  values = np.array(scores, np.float64)
  if np.isnan(values).all():
    return None
  return int(len(values) - 1 - np.nanargmax(values[::-1]))


PSEUDO_SCALARS = ("tv_distance", "macro_precision", "macro_recall", "mask_rate_all", "confident")


def pseudo_label_summary(counts: dict) -> dict:
  """Pseudo-label quality from summed per-class counts (`semi_state.pseudo_label_counts`), fractions in [0, 1]:
  per class precision (correct / confident among known labels), recall (correct / true), mask rate (confident /
  true); `estimated` (the class distribution of the confident pseudo-labels) and `true` (of the known labels of
  the unlabeled data), their total-variation distance, macro precision/recall over the classes where defined,
  the overall mask rate of known-label examples and the number of confident pseudo-labels. nan where a
  denominator is 0 (no known labels, e.g. STL-10's unlabeled set: only `estimated` is defined there)."""
  c = {k: np.asarray(v, np.float64) for k, v in counts.items()}
  ratio = lambda a, b: np.where(b > 0, a / np.maximum(b, 1e-300), np.nan)
  precision = ratio(c["correct"], c["confident_known"])
  recall = ratio(c["correct"], c["true"])
  estimated = ratio(c["confident"], np.full_like(c["confident"], c["confident"].sum()))
  true = ratio(c["true"], np.full_like(c["true"], c["true"].sum()))
  nanmean = lambda x: float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
  return {"precision": precision, "recall": recall, "mask_rate": ratio(c["confident_of_true"], c["true"]),
          "estimated": estimated, "true": true, "tv_distance": float(0.5 * np.abs(estimated - true).sum()),
          "macro_precision": nanmean(precision), "macro_recall": nanmean(recall),
          "mask_rate_all": float(ratio(c["confident_of_true"].sum(), c["true"].sum())),
          "confident": float(c["confident"].sum())}


def confusion_image(confusion, cell: int = 8) -> np.ndarray:
  """A [C*cell, C*cell, 3] uint8 heat map of a confusion matrix normalised per row (true class): white 0, dark
  blue 1; rows without examples stay white. For TensorBoard's image tab."""
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(axis=1, keepdims=True)
  share = np.where(rows > 0, confusion / np.maximum(rows, 1e-300), 0.0)
  low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
  rgb = low + share[..., None] * (high - low)
  return np.repeat(np.repeat(np.round(rgb).astype(np.uint8), cell, axis=0), cell, axis=1)


def bar_image(values, top: float = 100.0, width: int = 8, height: int = 64) -> np.ndarray:
  """A [height, C*width, 3] uint8 bar chart of per-class values in [0, top] (nan: no bar), one bar per class
  with a one-pixel gap. For TensorBoard's image tab."""
  values = np.nan_to_num(np.clip(np.asarray(values, np.float64) / top, 0.0, 1.0))
  image = np.full((height, len(values) * width, 3), 255, np.uint8)
  for c, v in enumerate(values):
    filled = int(round(v * height))
    if filled:
      image[height - filled:, c * width:(c + 1) * width - 1] = (31, 119, 180)
  return image


@dataclasses.dataclass(frozen=True)
class EvalLog:
  """What an eval.jsonl holds: its records (sorted by step; when a resumed run logged a step twice the last one
  wins) and where it is damaged. `partial_offset`: the byte offset of a last line cut short (a run killed, or a
  disk that filled, while appending), None if the file ends cleanly; `bad_lines`: other lines that are not valid
  records (line number, byte offset)."""
  path: str
  records: list
  exists: bool
  partial_offset: int | None = None
  bad_lines: tuple = ()
  size: int = 0

  def problems(self) -> list[str]:
    """One message per damaged part, naming the file and the byte offset."""
    out = [f"{self.path}: line {n} (byte {offset}) is not a valid record; skipped" for n, offset in self.bad_lines]
    if self.partial_offset is not None:
      out.append(f"{self.path}: the last line (from byte {self.partial_offset} to the end, {self.size} bytes) was "
                 "cut short, by a run killed or a disk that filled while writing it; dropped")
    return out


def parse_evals(path: str) -> EvalLog:
  """Reads an eval.jsonl (see `EvalLog`): the one reader of eval logs, for resuming runs and for reports."""
  if not files.exists(path):
    return EvalLog(path, [], exists=False)
  data = files.read_bytes(path)
  by_step, bad, partial, offset = {}, [], None, 0
  lines = data.split(b"\n")
  for n, line in enumerate(lines, 1):
    start, offset = offset, offset + len(line) + 1
    if not line.strip():
      continue
    try:
      record = json.loads(line.decode("utf-8"))
      step = int(record["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
      if n == len(lines):  # no newline after it: the line was being written
        partial = start
      else:
        bad.append((n, start))
      continue
    by_step[step] = record
  return EvalLog(path, [by_step[s] for s in sorted(by_step)], exists=True, partial_offset=partial,
                 bad_lines=tuple(bad), size=len(data))


def reported_head(record: dict) -> dict:
  """The reported head's metrics of an evaluation record."""
  return record[record["reported"]]


def read_evals(path: str) -> list[dict]:
  """The records of an eval.jsonl, sorted by step; damaged lines are skipped with a warning (`parse_evals`)."""
  log = parse_evals(path)
  for problem in log.problems():
    logging.warning("%s", problem)
  return log.records
