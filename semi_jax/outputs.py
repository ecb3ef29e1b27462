"""What one run writes in its workdir, whether it trains alone or stacked with others (semi_jax.together): the
eval log (eval.jsonl), TensorBoard events, summary.json and the final per-class table. Only process 0 writes.

The eval log is the run's record of every evaluation: the report and the selection by validation read it
(`metrics.parse_evals`, the one reader). A resumed run repairs it first: records after the checkpoint's step (the
run was killed before its next checkpoint) and a last line cut short are dropped, with a warning naming the file
and the byte offset, and a log that holds fewer evaluations than the run made is reported. TensorBoard events are
a view of the same numbers: a failure to write them is reported once, in one line, and the run goes on.
"""
from __future__ import annotations

import json

import jax
import numpy as np
from absl import logging

from semi_jax import algorithms, files, metrics

EVAL_LOG = "eval.jsonl"
SUMMARY = "summary.json"
CONFIG_FILE = "config.json"  # the config the run trains with (semi_jax.train writes it once the run can start)
# summary.json's "status": trained to the end, or stopped as diverged (its last good checkpoint kept).
FINISHED, DIVERGED = "finished", "diverged"


def flatten(d, prefix=""):
  """{dotted key: value} of nested dicts; values other than int, float, str and bool as strings."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def _first_line(error: BaseException) -> str:
  """The innermost cause of an error, in one line."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def repair_eval_log(path: str, step: int, expected_steps=(), name: str = "") -> int:
  """Makes an eval log what an uninterrupted run's log held at step `step`: drops the records after `step` and
  damaged lines (with a warning naming the file and the byte offset), and reports the `expected_steps` that are
  missing from it. Never raises for a damaged log: the run goes on. Returns the number of records kept."""
  where = f"{name}: " if name else ""
  log = metrics.parse_evals(path)
  for problem in log.problems():
    logging.warning("%s%s", where, problem)
  keep = [r for r in log.records if int(r["step"]) <= step]
  if len(keep) != len(log.records) or log.partial_offset is not None or log.bad_lines:
    files.write_text_atomic(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in keep))
  have = {int(r["step"]) for r in keep}
  missing = [s for s in expected_steps if s not in have]
  if missing:
    state = "is missing" if not log.exists else f"holds {len(have)} of the {len(have) + len(missing)} evaluations"
    logging.warning("%s%s %s up to step %d (missing: steps %s); training goes on, and the selection by validation "
                    "will see only the evaluations it holds.", where, path, state, step,
                    ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else ""))
  return len(keep)


class Events:
  """A run's TensorBoard events (clu's asynchronous writer), which never stop training: the first failure to
  write them (an error of the writer's thread surfaces at the next call) is logged in one line, and the run goes
  on without them; eval.jsonl keeps the record."""

  def __init__(self, workdir: str, lead: bool, name: str):
    from clu import metric_writers  # imports TensorFlow: only once a run trains
    self._name, self._workdir, self._failed = name, workdir, False
    try:
      self._writer = metric_writers.create_default_writer(workdir, just_logging=not lead, asynchronous=True)
    except Exception as e:  # noqa: BLE001 - reported in one line; training does not need the events
      self._fail(e)

  def _fail(self, error: BaseException) -> None:
    self._failed = True
    logging.warning("%s: the TensorBoard events in %s could not be written (%s); training goes on without them, "
                    "%s keeps every evaluation.", self._name, self._workdir, _first_line(error), EVAL_LOG)

  def _call(self, method: str, *args) -> None:
    if self._failed:
      return
    try:
      getattr(self._writer, method)(*args)
    except Exception as e:  # noqa: BLE001 - see the class docstring
      self._fail(e)

  def write_scalars(self, step: int, scalars: dict) -> None:
    self._call("write_scalars", step, scalars)

  def write_images(self, step: int, images: dict) -> None:
    self._call("write_images", step, images)

  def write_hparams(self, hparams: dict) -> None:
    self._call("write_hparams", hparams)

  def flush(self) -> None:
    self._call("flush")

  def close(self) -> None:
    self._call("close")
    self._failed = True


class RunOutputs:
  """The outputs of one run: `open` at the start of training, `write_train` / `write_eval` while it trains, then
  `finish` (summary.json with status finished) or `diverged` (status diverged)."""

  def __init__(self, config, workdir: str, data, name: str = ""):
    """`data`: the run's `input_pipeline.SSLData`."""
    self.config, self.workdir, self.data = config, workdir, data
    self.name = name or workdir
    self.is_lead = jax.process_index() == 0
    self.groups = metrics.shot_groups(data.labeled_counts, config.eval.many_threshold, config.eval.few_threshold)
    self.events = None
    self.log_path = files.join(workdir, EVAL_LOG)
    self._evals_in_log = 0  # records the eval log should hold (after the repair, plus those appended since)
    self._warned_missing = False

  # --- start ----------------------------------------------------------------------------------------------------

  def open(self, start: int) -> None:
    """Starts the run's outputs at step `start` (0, or the restored checkpoint's step): repairs the eval log and
    opens the TensorBoard events."""
    if self.is_lead:
      self.repair_log(start)
    self.events = Events(self.workdir, self.is_lead, self.name)
    if start == 0:
      self.events.write_hparams(flatten(self.config.to_dict()))

  def expected_evals(self, step: int) -> list[int]:
    """The steps up to `step` at which the run evaluates (with the current train.eval_every_steps)."""
    t = self.config.train
    steps = list(range(t.eval_every_steps, step + 1, t.eval_every_steps))
    if step == t.total_steps and step % t.eval_every_steps:
      steps.append(step)
    return steps

  def repair_log(self, start: int) -> None:
    """Makes the eval log what an uninterrupted run's log held at step `start` (`repair_eval_log`)."""
    self._evals_in_log = repair_eval_log(self.log_path, start, self.expected_evals(start), self.name)

  # --- while training -------------------------------------------------------------------------------------------

  def write_train(self, step: int, values: dict) -> None:
    self.events.write_scalars(step, {f"train/{k}": v for k, v in values.items()})

  def summarize(self, sums) -> dict:
    """Summaries of both heads from the eval step's sums (numpy) over one image set."""
    return {"standard": metrics.summarize_confusion(sums["confusion"], self.groups),
            "balanced": metrics.summarize_confusion(sums["confusion_b"], self.groups),
            "loss_b": float(sums["loss_b_sum"] / max(sums["count"], 1.0)),
            "confusion": {"standard": sums["confusion"], "balanced": sums["confusion_b"]}}

  def eval_result(self, test: dict, validation: dict | None) -> dict:
    """The evaluation of the run: the test summaries, the reported head, and the validation summaries."""
    result = dict(test, reported="balanced" if self.config.ssl.dual_head else "standard")
    if validation is not None:
      result["validation"] = {"standard": validation["standard"], "balanced": validation["balanced"]}
    return result

  def write_eval(self, step: int, result: dict, bank_stats: dict) -> None:
    """One evaluation: TensorBoard scalars and images, and a record appended to the eval log. `bank_stats`: the
    memory bank's per-class fill and mean confidence (numpy)."""
    head = result[result["reported"]]
    scalars = {"eval/acc": head["acc"], "eval/balanced_acc": head["balanced_acc"],
               "eval/acc_standard_head": result["standard"]["acc"],
               "eval/acc_balanced_head": result["balanced"]["acc"], "eval/loss_balanced_head": result["loss_b"],
               "eval/gm": head["gm"], "eval/macro_precision": head["macro_precision"],
               "eval/macro_recall": head["macro_recall"], "eval/macro_f1": head["macro_f1"]}
    for g in ("many", "medium", "few"):
      scalars[f"eval/acc_{g}"] = head[f"acc_{g}"]
    for c, a in enumerate(head["per_class"]):
      scalars[f"eval_class/acc_{c:03d}"] = a
    if "validation" in result:
      val = result["validation"][result["reported"]]
      scalars.update({"val/acc": val["acc"], "val/balanced_acc": val["balanced_acc"], "val/gm": val["gm"]})
    pl = result.get("pseudo_labels")
    if pl is not None:
      scalars.update({f"pseudo/{k}": pl[k] for k in metrics.PSEUDO_SCALARS})
      for k in ("precision", "recall", "mask_rate", "estimated", "true"):
        scalars.update({f"pseudo_class/{k}_{c:03d}": v for c, v in enumerate(pl[k])})
    fill, conf = np.asarray(bank_stats["fill"]), np.asarray(bank_stats["confidence"])
    if self.config.bank.enabled:
      for c in range(self.data.num_classes):
        scalars[f"bank/fill_{c:03d}"] = fill[c]
        scalars[f"bank/confidence_{c:03d}"] = conf[c]
    self.events.write_scalars(step, scalars)
    confusion = result["confusion"][result["reported"]]
    self.events.write_images(step, {"eval/confusion_matrix": metrics.confusion_image(confusion)[None],
                                    "eval/per_class_accuracy": metrics.bar_image(head["per_class"])[None]})
    if not self.is_lead:
      return
    record = {"step": step, "reported": result["reported"], "loss_b": result["loss_b"],
              "bank_fill": fill.tolist(), "bank_confidence": conf.tolist()}
    as_json = lambda summary: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in summary.items()}
    for name in ("standard", "balanced"):
      record[name] = as_json(result[name])
    if "validation" in result:
      record["validation"] = {name: as_json(result["validation"][name]) for name in ("standard", "balanced")}
    if "pseudo_labels" in result:
      record["pseudo_labels"] = as_json(result["pseudo_labels"])
    if self._evals_in_log and not self._warned_missing and not files.exists(self.log_path):
      self._warned_missing = True
      logging.warning("%s: %s was deleted while the run trained (it held %d evaluations); it starts again with "
                      "the evaluation of step %d, and the selection by validation will see only the evaluations "
                      "from here on.", self.name, self.log_path, self._evals_in_log, step)
    files.append_line(self.log_path, json.dumps(record, allow_nan=True))
    self._evals_in_log += 1

  # --- end ------------------------------------------------------------------------------------------------------

  def finish(self, result, *, step: int, trained_steps: int, skipped_steps: int, elapsed: float) -> dict:
    """The run's summary (status finished); process 0 writes it to summary.json and prints the per-class table."""
    summary = self.summary(result, step=step, trained_steps=trained_steps, skipped_steps=skipped_steps,
                           elapsed=elapsed)
    if self.is_lead:
      summary["selected_by_validation"] = self.selected_by_validation()
      files.write_json_atomic(files.join(self.workdir, SUMMARY), summary)
      if self.config.train.print_table:
        print(self.final_report(result, summary))
    return summary

  def diverged(self, *, step: int, terms: dict, skipped_steps: int, trained_steps: int, checkpoint: str | None,
               message: str) -> dict:
    """The summary of a run stopped as diverged at `step` (status diverged, the loss terms of its first
    non-finite step, its last good checkpoint); process 0 writes it to summary.json."""
    summary = {"status": DIVERGED, "step": step, "algo": self.config.ssl.algo,
               "components": algorithms.switches_of(self.config),
               "terms": {k: float(v) for k, v in terms.items()}, "skipped_steps": skipped_steps,
               "trained_steps": trained_steps, "last_good_checkpoint": checkpoint, "message": message}
    if self.is_lead:
      files.write_json_atomic(files.join(self.workdir, SUMMARY), summary)
    return summary

  def close(self) -> None:
    if self.events is not None:
      self.events.flush()
      self.events.close()

  def summary(self, result, *, step: int, trained_steps: int, skipped_steps: int, elapsed: float) -> dict:
    head = result[result["reported"]]
    return {"status": FINISHED, "step": step, "algo": self.config.ssl.algo,
            "components": algorithms.switches_of(self.config), "reported_head": result["reported"],
            "acc": head["acc"], "balanced_acc": head["balanced_acc"], "gm": head["gm"],
            "macro_precision": head["macro_precision"], "macro_recall": head["macro_recall"],
            "macro_f1": head["macro_f1"],
            "acc_many": head["acc_many"], "acc_medium": head["acc_medium"], "acc_few": head["acc_few"],
            "acc_standard_head": result["standard"]["acc"], "acc_balanced_head": result["balanced"]["acc"],
            "per_class": [float(a) for a in head["per_class"]],
            "pseudo_labels": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                              for k, v in result.get("pseudo_labels", {}).items()} or None,
            "labeled_counts": self.data.labeled_counts.tolist(),
            "trained_steps": trained_steps, "skipped_steps": skipped_steps, "train_seconds": elapsed}

  def selected_by_validation(self):
    """The evaluation with the best validation balanced accuracy (its step, validation and test accuracy of the
    reported head, and how many evaluations it was chosen among), from the run's eval log; None without a
    validation set."""
    records = metrics.read_evals(self.log_path)
    best = metrics.select_by_validation(records)
    if best is None:
      return None
    r = records[best]
    test, val = r[r["reported"]], r["validation"][r["reported"]]
    return {"step": r["step"], "val_balanced_acc": val["balanced_acc"], "balanced_acc": test["balanced_acc"],
            "acc": test["acc"], "gm": test.get("gm"), "acc_few": test["acc_few"], "evaluations": len(records)}

  def final_report(self, result, summary) -> str:
    table = metrics.format_table({"standard": result["standard"]["per_class"],
                                  "balanced": result["balanced"]["per_class"]},
                                 self.data.labeled_counts, self.data.unlabeled_counts)
    s = summary
    lines = [f"\nPer-class test accuracy (%) after {s['step']} steps, EMA weights:\n{table}",
             f"Reported head ({s['reported_head']}): top-1 {s['acc']:.2f}  balanced {s['balanced_acc']:.2f}  "
             f"many {s['acc_many']:.2f}  medium {s['acc_medium']:.2f}  few {s['acc_few']:.2f}"]
    selected = s.get("selected_by_validation")
    if selected:
      lines.append(f"Selected by validation among {selected['evaluations']} evaluations: step {selected['step']}, "
                   f"balanced {selected['balanced_acc']:.2f}")
    if s["skipped_steps"]:
      lines.append(f"Skipped steps (non-finite loss or gradients): {s['skipped_steps']} of {s['step']}")
    return "\n".join(lines) + "\n"
