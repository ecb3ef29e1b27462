"""Result tables and plots of a sweep directory (see semi_jax.sweep); the plots are drawn by semi_jax.report_plots.

  python -m semi_jax.report --workdir=DIR [--last_n=5] [--paired_on=best_val|final|last_n|pl_precision|pl_recall]
                            [--reference=VARIANT]

Reads every run DIR/<variant>/seed_<s> (its eval.jsonl, summary.json and sweep_variant.json) and writes (the
paired columns compare each variant seed by seed with the reference: the first one or --reference, see
`paired_difference`)
  DIR/report.csv, DIR/report.md  one row per variant: final, at-best-validation and mean-of-the-last-N balanced
                                 accuracy and the final many/medium/few and top-1 accuracy, geometric mean of
                                 the per-class recalls (gm) and macro F1 of the reported head, each as mean
                                 and sample standard deviation (ddof=1) over seeds;
  DIR/balanced_acc.png           test balanced accuracy vs step, mean over seeds (band: +- std);
  DIR/bank.png                   memory-bank mean confidence and fill vs step (averaged over classes);
  DIR/per_class.png              final per-class accuracy per variant (error bars: std over seeds);
  DIR/paired.png                 each variant's paired difference from the reference with its 95 % interval;
  DIR/pseudo_labels.png          per-class pseudo-label precision, recall, mask rate and estimated vs true
                                 unlabeled class distribution over the last evaluation interval;
  DIR/schedules.png              the swept schedules of every variant vs step (when any schedule is swept).
Accuracies are in %. A run that has not finished is included with its latest evaluation (see 'steps').
DIR may be on a remote file system such as gs:// (see semi_jax.files).
"""
from __future__ import annotations

from collections.abc import Sequence
import csv
import dataclasses
import io
import math
import os
import re
import sys

import numpy as np

from semi_jax import files, metrics, outputs, report_plots, schedules, sweep
from semi_jax.outputs import DIVERGED, FINISHED

EVAL_LOG = outputs.EVAL_LOG  # one record per evaluation
CSV_FILE, MD_FILE = "report.csv", "report.md"
PLOTS = {"balanced_acc": "balanced_acc.png", "bank": "bank.png", "per_class": "per_class.png",
         "paired": "paired.png", "pseudo_labels": "pseudo_labels.png", "schedules": "schedules.png"}
# Per-variant statistics (CSV columns <name>_mean, <name>_std); per-seed values from seed_metrics.
METRICS = ("final_balanced_acc", "val_selected_balanced_acc", "last_n_balanced_acc", "acc_many", "acc_medium",
           "acc_few", "acc", "gm", "macro_f1", "pl_macro_precision", "pl_macro_recall", "pl_tv_distance")
# The columns of report.md (report.csv has every metric), with their headers.
MD_METRICS = {"final_balanced_acc": "final bal. acc", "val_selected_balanced_acc": "bal. acc at best val.",
              "last_n_balanced_acc": None, "acc_many": "many", "acc_medium": "medium", "acc_few": "few",
              "gm": "GM"}
_SEED_DIR = re.compile(r"seed_(\d+)")


@dataclasses.dataclass(frozen=True)
class PairedOn:
  """A per-seed statistic the paired columns can compare (--paired_on)."""
  metric: str  # key of seed_metrics
  text: str  # what report.md says is compared ({last_n} is filled in)
  label: str  # paired.png's title
  scale: float = 1.0  # to points: the pseudo-label fractions become percentage points


PAIRED_ON = {
    "best_val": PairedOn("val_selected_balanced_acc", "the test balanced accuracy at the best validation "
                         "evaluation", "test bal. acc at best val."),
    "final": PairedOn("final_balanced_acc", "the final balanced accuracy", "final test bal. acc"),
    "last_n": PairedOn("last_n_balanced_acc", "the mean balanced accuracy of the last {last_n} evaluations",
                       "test bal. acc, mean of the last evaluations"),
    # Pseudo-label quality over the last evaluation interval: what the miner and the bank set out to improve.
    "pl_precision": PairedOn("pl_macro_precision", "the pseudo-labels' macro precision over the last evaluation "
                             "interval (in points: x100)", "pseudo-label macro precision (x100)", 100.0),
    "pl_recall": PairedOn("pl_macro_recall", "the pseudo-labels' macro recall over the last evaluation interval "
                          "(in points: x100)", "pseudo-label macro recall (x100)", 100.0),
}
_PAIRED_BY_METRIC = {p.metric: p for p in PAIRED_ON.values()}


@dataclasses.dataclass
class SeedRun:
  """One training run of a sweep as found on disk."""
  variant: str
  seed: int
  workdir: str
  index: int  # the variant's position in its sweep file (large when unknown)
  overrides: dict
  config: dict | None  # the full configuration, when sweep_variant.json has it
  evals: list[dict]  # evaluation records sorted by step, one per step
  summary: dict | None


def load_runs(workdir: str) -> list[SeedRun]:
  """Every DIR/<variant>/seed_<s> run, in sweep order (then by name and seed)."""
  if not files.isdir(workdir):
    raise ValueError(f"--workdir={workdir!r} is not a directory; give the sweep directory of semi_jax.sweep.")
  runs = []
  for variant_dir in files.listdir(workdir):
    vpath = files.join(workdir, variant_dir)
    if not files.isdir(vpath):
      continue
    for seed_dir in files.listdir(vpath):
      match = _SEED_DIR.fullmatch(seed_dir)
      rpath = files.join(vpath, seed_dir)
      if not match or not files.isdir(rpath):
        continue
      meta = files.read_json(files.join(rpath, sweep.VARIANT_FILE)) or {}
      runs.append(SeedRun(variant=meta.get("name", variant_dir), seed=int(meta.get("seed", match.group(1))),
                          workdir=rpath, index=int(meta.get("index", sys.maxsize)),
                          overrides=meta.get("overrides", {}), config=meta.get("config"),
                          evals=metrics.read_evals(files.join(rpath, EVAL_LOG)),
                          summary=files.read_json(files.join(rpath, sweep.SUMMARY))))
  runs.sort(key=lambda r: (r.index, r.variant, r.seed))
  return runs


def seed_metrics(evals: Sequence[dict], last_n: int) -> dict:
  """The statistics of one run: final balanced accuracy, the test balanced accuracy at the evaluation with the
  best validation balanced accuracy (nan without a validation set: nothing is ever selected on the test set),
  mean of the last `last_n` balanced accuracies, final groups, GM and macro F1."""
  balanced = np.array([metrics.reported_head(r)["balanced_acc"] for r in evals], np.float64)
  final = metrics.reported_head(evals[-1])
  selected = metrics.select_by_validation(evals)
  return {"final_balanced_acc": balanced[-1],
          "val_selected_balanced_acc": float("nan") if selected is None else balanced[selected],
          "last_n_balanced_acc": np.mean(balanced[-last_n:]), "acc_many": final["acc_many"],
          "acc_medium": final["acc_medium"], "acc_few": final["acc_few"], "acc": final["acc"],
          # (absent from the records of older versions)
          "gm": final.get("gm", float("nan")), "macro_f1": final.get("macro_f1", float("nan")),
          # Pseudo-label quality over the last evaluation interval (fractions, as the run records them).
          **{f"pl_{k}": (evals[-1].get("pseudo_labels") or {}).get(k, float("nan"))
             for k in ("macro_precision", "macro_recall", "tv_distance")},
          "step": int(evals[-1]["step"])}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; nan for a single value; both nan for none)."""
  x = np.asarray(values, np.float64)
  if not x.size:
    return float("nan"), float("nan")
  return float(np.mean(x)), (float(np.std(x, ddof=1)) if x.size > 1 else float("nan"))


def run_status(run: SeedRun) -> str | None:
  """The run's summary.json status: finished or diverged (None while it trains)."""
  if run.summary is None:
    return None
  return run.summary.get("status", FINISHED)  # (summaries of earlier versions have no status: finished)


def _by_variant(runs: Sequence[SeedRun]) -> dict[str, list[SeedRun]]:
  groups = {}
  for run in runs:
    groups.setdefault(run.variant, []).append(run)
  return groups


def group_by_variant(runs: Sequence[SeedRun]) -> dict[str, list[SeedRun]]:
  """Variant name -> its runs that have at least one evaluation, in sweep order."""
  groups = {}
  for run in runs:
    if run.evals:
      groups.setdefault(run.variant, []).append(run)
  return groups


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: a series in 1/df around 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
  """The 97.5 % quantile of Student's t with `df` degrees of freedom (a 95 % two-sided interval)."""
  if df < 1:
    return float("nan")
  if df <= len(_T975):
    return _T975[df - 1]
  z = 1.959964
  return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict:
  """Seed-by-seed comparison of a variant with the reference (runs of one seed share the split and the input
  stream): over the seeds both have, the mean difference with a 95 % t-interval (nan for one seed), the number
  of seeds in which the variant is better, and whether the interval excludes 0."""
  seeds = sorted(set(values) & set(reference))
  d = np.array([values[s] - reference[s] for s in seeds], np.float64)
  d = d[np.isfinite(d)]
  n = d.size
  mean = float(d.mean()) if n else float("nan")
  half = t_quantile_975(n - 1) * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
  low, high = mean - half, mean + half
  return {"paired_n": n, "paired_mean": mean, "paired_ci_low": low, "paired_ci_high": high,
          "paired_wins": int((d > 0).sum()), "paired_excludes_0": bool(n > 1 and (low > 0 or high < 0))}


def summarize(runs: Sequence[SeedRun], last_n: int = 5, paired_on: str = "best_val",
              reference: str | None = None) -> list[dict]:
  """One row per variant: seeds, finished runs, steps (the least advanced seed), mean/std of each metric, and
  the paired comparison with the reference variant (`paired_difference`) of one per-seed metric (`paired_metric`):
  by `paired_on` (see PAIRED_ON), the test balanced accuracy at the best validation evaluation ("best_val"; the
  final one where some run has no validation set), the final one ("final"), the mean of the last `last_n`
  ("last_n", which also rewards reaching the accuracy sooner), or the pseudo-labels' macro precision or recall
  over the last evaluation interval in points ("pl_precision", "pl_recall").
  The reference is the first variant of the sweep, or `reference`; its row comes first, the others keep their
  order."""
  if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1:
    raise ValueError(f"last_n={last_n!r} is invalid; give the number of final evaluations to average (>= 1).")
  if paired_on not in PAIRED_ON:
    raise ValueError(f"paired_on={paired_on!r} is invalid; choose one of {', '.join(PAIRED_ON)}.")
  rows, by_seed = [], []
  for variant, every in _by_variant(runs).items():
    diverged = [r for r in every if run_status(r) == DIVERGED]
    group = [r for r in every if r.evals and r not in diverged]  # the statistics: runs that did not diverge
    if not group and not diverged:
      continue  # no evaluation yet
    per_seed = [seed_metrics(r.evals, last_n) for r in group]
    by_seed.append({r.seed: m for r, m in zip(group, per_seed)})
    row = {"variant": variant, "seeds": len(group),
           "finished": sum(r.summary is not None and r.summary.get("step") == r.evals[-1]["step"] for r in group),
           "steps": min((m["step"] for m in per_seed), default=0), "diverged": len(diverged),
           "skipped_steps": sum(int((r.summary or {}).get("skipped_steps") or 0) for r in every)}
    row["status"] = ", ".join(part for part in (
        f"{row['seeds']} trained" if row["seeds"] else "",
        f"{len(diverged)} diverged (" + ", ".join(f"seed {r.seed} at step {r.summary.get('step')}"
                                                  for r in diverged) + ")" if diverged else "") if part)
    for name in METRICS:
      row[f"{name}_mean"], row[f"{name}_std"] = mean_std([m[name] for m in per_seed])
    row["overrides"] = describe_overrides(every[0])
    rows.append(row)
  if reference is not None:
    names = [row["variant"] for row in rows]
    if reference not in names:
      raise ValueError(f"reference={reference!r} is no variant with an evaluation here; choose one of {names}.")
    first = names.index(reference)
    rows.insert(0, rows.pop(first))
    by_seed.insert(0, by_seed.pop(first))
  if rows:
    ref = rows[0]["final_balanced_acc_mean"]
    for row in rows:  # difference to the reference (the first row)
      row["final_delta"] = row["final_balanced_acc_mean"] - ref
    paired = PAIRED_ON[paired_on]
    if paired.metric == "val_selected_balanced_acc" and not all(
        np.isfinite(m[paired.metric]) for seeds in by_seed for m in seeds.values()):
      paired = PAIRED_ON["final"]
    reference = {s: paired.scale * m[paired.metric] for s, m in by_seed[0].items()}
    for row, seeds in zip(rows, by_seed):
      row["paired_metric"] = paired.metric
      row.update(paired_difference({s: paired.scale * m[paired.metric] for s, m in seeds.items()}, reference))
  return rows


def describe_overrides(run: SeedRun) -> str:
  """The overrides in words; a changed schedule is shown as its formula."""
  flat = sweep.flatten_overrides(run.overrides)
  if not flat:
    return "(base)"
  parts, done = [], set()
  for key, value in flat.items():
    path = sweep.schedule_path(run.config, key)
    if path is None:
      parts.append(f"{key}={value}")
    elif path not in done:
      done.add(path)
      parts.append(f"{path}: {schedules.describe(sweep.config_at(run.config, path))}")
  return "; ".join(parts)


# --- files ------------------------------------------------------------------------------------------------


def write_csv(rows: Sequence[dict], path: str) -> None:
  columns = ["variant", "seeds", "finished", "steps", "diverged", "skipped_steps", "status"]
  columns += [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + ["final_delta"]
  columns += ["paired_metric", "paired_n", "paired_mean", "paired_ci_low", "paired_ci_high", "paired_wins",
              "paired_excludes_0", "overrides"]
  buffer = io.StringIO()  # then one atomic write through semi_jax.files (the directory may be on gs://)
  writer = csv.DictWriter(buffer, fieldnames=columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
  files.write_text_atomic(path, buffer.getvalue())


def _pm(mean: float, std: float) -> str:
  if math.isnan(mean):
    return "n/a"
  return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _paired_cell(row: dict) -> str:
  if not row["paired_n"]:
    return "n/a"
  if math.isnan(row["paired_ci_low"]):
    return f"{row['paired_mean']:+.2f}"
  mark = " *" if row["paired_excludes_0"] else ""
  return f"{row['paired_mean']:+.2f} [{row['paired_ci_low']:+.2f}, {row['paired_ci_high']:+.2f}]{mark}"


def markdown(rows: Sequence[dict], last_n: int, plots: Sequence[str], pending: Sequence[str] = ()) -> str:
  header = ["variant", "seeds", "steps", "status", "skipped steps"]
  header += [label or f"last-{last_n} bal. acc" for label in MD_METRICS.values()]
  header += ["Δ final", "paired Δ (95% CI)", "wins", "overrides"]
  paired = _PAIRED_BY_METRIC[rows[0]["paired_metric"] if rows else "final_balanced_acc"].text.format(last_n=last_n)
  lines = ["# Ablation report", "",
           f"Balanced top-1 accuracy (%) of the reported head on the test set, mean ± std over seeds (ddof=1). "
           "'at best val.' is the test accuracy of the evaluation with the best validation balanced accuracy "
           "(n/a without data.val_per_class; nothing is selected on the test set). "
           f"'last-{last_n}' averages each seed's last {last_n} evaluations; many/medium/few and GM (geometric "
           "mean of per-class recall) are final; "
           f"Δ final is relative to {rows[0]['variant'] if rows else 'the first variant'}. 'paired Δ' is the mean "
           f"seed-by-seed difference from it (runs of one seed share the split and the input stream) of {paired}, "
           "with a 95 % t-interval over seeds; * marks an interval that excludes 0; 'wins' counts the seeds in "
           "which the variant is better. 'steps' is the step "
           "of the least advanced seed; seeds marked * have not finished. 'status' counts the seeds that trained "
           "and those that diverged (their summary.json says where; they are left out of every statistic), "
           "'skipped steps' the steps skipped as non-finite over all seeds (train.skip_nonfinite_steps).", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    seeds = f"{r['seeds']}" + ("" if r["finished"] == r["seeds"] else f" ({r['seeds'] - r['finished']}*)")
    cells = [r["variant"], seeds, str(r["steps"]), r["status"], str(r["skipped_steps"])]
    cells += [_pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in MD_METRICS]
    paired = ["(reference)", "-"] if r is rows[0] else [_paired_cell(r), f"{r['paired_wins']}/{r['paired_n']}"]
    cells += [f"{r['final_delta']:+.2f}", *paired, r["overrides"].replace("|", "/")]
    lines.append("| " + " | ".join(cells) + " |")
  if pending:
    lines += ["", "No evaluation yet: " + ", ".join(pending) + "."]
  lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


# --- plots ------------------------------------------------------------------------------------------------


def make_report(workdir: str, last_n: int = 5, paired_on: str = "best_val",
                reference: str | None = None) -> dict[str, str]:
  """Writes the tables and plots of a sweep directory; returns {name: path} of the files written."""
  runs = load_runs(workdir)
  rows = summarize(runs, last_n, paired_on, reference)
  if not rows:
    raise ValueError(f"no run under {workdir} has an evaluation yet (expected {workdir}/<variant>/seed_<s>/"
                     f"{EVAL_LOG}); run python -m semi_jax.sweep --workdir={workdir} first.")
  groups = group_by_variant(runs)
  pending = sorted({r.variant for r in runs} - set(groups) - {row["variant"] for row in rows})
  written = {}
  report_plots.plot_metric_curves(groups, files.join(workdir, PLOTS["balanced_acc"]),
                                  [("Test balanced accuracy (reported head)", "balanced accuracy (%)",
                                    lambda r: metrics.reported_head(r)["balanced_acc"])])
  report_plots.plot_metric_curves(groups, files.join(workdir, PLOTS["bank"]),
                                  [("Memory bank: mean confidence", "confidence",
                                    report_plots.bank_mean("bank_confidence")),
                                   ("Memory bank: fill", "filled fraction", report_plots.bank_mean("bank_fill"))])
  report_plots.plot_per_class(groups, files.join(workdir, PLOTS["per_class"]))
  names = ["balanced_acc", "bank", "per_class"]
  label = _PAIRED_BY_METRIC[rows[0]["paired_metric"]].label
  if report_plots.plot_paired(rows, files.join(workdir, PLOTS["paired"]), label):
    names.append("paired")
  if report_plots.plot_pseudo_labels(groups, files.join(workdir, PLOTS["pseudo_labels"])):
    names.append("pseudo_labels")
  if report_plots.plot_schedules(groups, files.join(workdir, PLOTS["schedules"])):
    names.append("schedules")
  written.update({n: files.join(workdir, PLOTS[n]) for n in names})
  written["csv"] = files.join(workdir, CSV_FILE)
  write_csv(rows, written["csv"])
  written["md"] = files.join(workdir, MD_FILE)
  files.write_text_atomic(written["md"], markdown(rows, last_n, [PLOTS[n] for n in names], pending))
  return written


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "Sweep directory written by semi_jax.sweep.")
  flags.DEFINE_integer("last_n", 5, "Average the balanced accuracy of each run's last N evaluations.")
  flags.DEFINE_enum("paired_on", "best_val", list(PAIRED_ON), "What the paired columns compare seed by seed: the "
                    "test balanced accuracy at the best validation evaluation (final without validation sets), "
                    "the final one, the mean of the last N (less noisy; also rewards learning sooner), or the "
                    "pseudo-labels' macro precision or recall over the last evaluation interval (x100).")
  flags.DEFINE_string("reference", None, "The variant every other is compared with (Δ final and the paired "
                      "columns); default: the first variant of the sweep.")
  flags.mark_flags_as_required(["workdir"])
  return flags.FLAGS


def main(argv, flag_values) -> None:
  if len(argv) > 1:
    sys.exit(f"semi_jax.report: unexpected arguments {argv[1:]}")
  try:
    written = make_report(flag_values.workdir, flag_values.last_n, flag_values.paired_on, flag_values.reference)
  except ValueError as e:
    sys.exit(f"semi_jax.report: {e}")
  print(files.read_text(written["md"]))
  print("Wrote " + ", ".join(written.values()))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (gfile) is loaded for a gs:// --workdir
  from absl import app
  FLAGS = _define_flags()
  app.run(lambda argv: main(argv, FLAGS))
