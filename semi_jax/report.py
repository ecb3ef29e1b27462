"""Result tables and plots of a sweep directory (see semi_jax.sweep).

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
import warnings

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from semi_jax import files, metrics, outputs, schedules, sweep
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


def _head(record: dict) -> dict:
  """The reported head's metrics of an evaluation record."""
  return record[record["reported"]]


def seed_metrics(evals: Sequence[dict], last_n: int) -> dict:
  """The statistics of one run: final balanced accuracy, the test balanced accuracy at the evaluation with the
  best validation balanced accuracy (nan without a validation set: nothing is ever selected on the test set),
  mean of the last `last_n` balanced accuracies, final groups, GM and macro F1."""
  balanced = np.array([_head(r)["balanced_acc"] for r in evals], np.float64)
  final = _head(evals[-1])
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


def schedule_path(config: dict | None, key: str) -> str | None:
  """The schedule a dotted override key belongs to ('bank.beta.value' -> 'bank.beta'), else None."""
  node, parts = config, key.split(".")
  for depth in range(len(parts) + 1):
    if isinstance(node, dict) and set(node) == set(schedules.FIELD_TYPES):
      return ".".join(parts[:depth])
    if depth == len(parts) or not isinstance(node, dict) or parts[depth] not in node:
      return None
    node = node[parts[depth]]
  return None


def _lookup(config: dict, path: str):
  for part in path.split("."):
    config = config[part]
  return config


def swept_schedules(run: SeedRun) -> list[str]:
  """The schedules a run's overrides change, in order of appearance."""
  paths = [schedule_path(run.config, key) for key in sweep.flatten_overrides(run.overrides)]
  return list(dict.fromkeys(p for p in paths if p))


def describe_overrides(run: SeedRun) -> str:
  """The overrides in words; a changed schedule is shown as its formula."""
  flat = sweep.flatten_overrides(run.overrides)
  if not flat:
    return "(base)"
  parts, done = [], set()
  for key, value in flat.items():
    path = schedule_path(run.config, key)
    if path is None:
      parts.append(f"{key}={value}")
    elif path not in done:
      done.add(path)
      parts.append(f"{path}: {schedules.describe(_lookup(run.config, path))}")
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


def _colors(n: int):
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Figure, path: str) -> None:
  FigureCanvasAgg(fig)
  fig.tight_layout()
  buffer = io.BytesIO()  # savefig cannot write to gs://: through a buffer and semi_jax.files
  fig.savefig(buffer, format="png", dpi=110)
  files.write_bytes_atomic(path, buffer.getvalue())


def mean_curve(group: Sequence[SeedRun], value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Steps, mean and std over seeds of value(record); a step is averaged over the seeds that reached it."""
  steps = sorted({int(r["step"]) for run in group for r in run.evals})
  table = np.full((len(group), len(steps)), np.nan)
  col = {s: i for i, s in enumerate(steps)}
  for i, run in enumerate(group):
    for r in run.evals:
      table[i, col[int(r["step"])]] = value(r)
  count = np.sum(~np.isnan(table), axis=0)
  mean = np.nanmean(table, axis=0)
  centred = np.where(np.isnan(table), 0.0, table - mean)
  std = np.where(count > 1, np.sqrt(np.sum(centred ** 2, axis=0) / np.maximum(count - 1, 1)), 0.0)
  return np.asarray(steps), mean, std


def plot_metric_curves(groups: dict[str, list[SeedRun]], path: str, panels) -> None:
  """One panel per (title, y label, value(record)); one line per variant with a +-std band."""
  fig = Figure(figsize=(6.5 * len(panels), 4.5))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  colors = _colors(len(groups))
  for ax, (title, ylabel, value) in zip(axes, panels):
    for color, (variant, group) in zip(colors, groups.items()):
      steps, mean, std = mean_curve(group, value)
      ax.plot(steps, mean, marker="o", markersize=3, color=color, label=f"{variant} (n={len(group)})")
      ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=7, loc="best")
  _save(fig, path)


def plot_per_class(groups: dict[str, list[SeedRun]], path: str) -> None:
  """Grouped bars: final per-class accuracy of the reported head, one bar per variant."""
  num_classes = max(len(_head(run.evals[-1])["per_class"]) for g in groups.values() for run in g)
  width = 0.8 / len(groups)
  fig = Figure(figsize=(min(max(8.0, 0.35 * num_classes * len(groups)), 40.0), 4.5))
  ax = fig.subplots()
  x = np.arange(num_classes)
  for i, (color, (variant, group)) in enumerate(zip(_colors(len(groups)), groups.items())):
    accs = np.array([_head(run.evals[-1])["per_class"] for run in group], np.float64)
    std = np.std(accs, axis=0, ddof=1) if len(group) > 1 else None
    ax.bar(x - 0.4 + (i + 0.5) * width, np.mean(accs, axis=0), width, yerr=std, color=color, label=variant,
           error_kw={"elinewidth": 0.6})
  ax.set(title="Final per-class test accuracy (reported head, mean over seeds)", xlabel="class",
         ylabel="accuracy (%)", ylim=(0, 105))
  ax.set_xticks(x if num_classes <= 40 else x[::max(num_classes // 20, 1)])
  ax.legend(fontsize=7, ncol=min(len(groups), 4))
  _save(fig, path)


def plot_paired(rows: Sequence[dict], path: str) -> bool:
  """Every variant's mean paired difference from the reference with its 95 % interval (a dot alone for one
  seed), a line at 0. False (nothing written) when there is no variant besides the reference."""
  others = [r for r in rows[1:] if r["paired_n"]]
  if not others:
    return False
  fig = Figure(figsize=(8.0, 1.2 + 0.4 * len(others)))
  ax = fig.subplots()
  y = np.arange(len(others))[::-1]
  means = np.array([r["paired_mean"] for r in others])
  low = np.array([r["paired_ci_low"] for r in others])
  high = np.array([r["paired_ci_high"] for r in others])
  err = np.where(np.isnan(low), 0.0, np.stack([means - low, high - means]))
  for i, r in enumerate(others):
    color = "tab:red" if r["paired_excludes_0"] else "tab:blue"
    ax.errorbar(means[i], y[i], xerr=err[:, i:i + 1], fmt="o", color=color, capsize=3)
  ax.axvline(0.0, color="black", linewidth=0.8)
  ax.set_yticks(y, [f"{r['variant']} ({r['paired_wins']}/{r['paired_n']})" for r in others], fontsize=8)
  what = _PAIRED_BY_METRIC[rows[0]["paired_metric"]].label
  ax.set(title=f"Paired Δ from {rows[0]['variant']}, {what} (95 % CI; red: excludes 0)",
         xlabel="difference (points); in brackets: seeds better / seeds")
  ax.title.set_fontsize(9)
  _save(fig, path)
  return True


def plot_pseudo_labels(groups: dict[str, list[SeedRun]], path: str) -> bool:
  """Per-class pseudo-label precision, recall and mask rate of the last evaluation interval, and the estimated
  against the true unlabeled class distribution; one bar per variant (mean over seeds). False (nothing written)
  when no run recorded pseudo-label statistics."""
  stats = {v: [r.evals[-1]["pseudo_labels"] for r in g if r.evals[-1].get("pseudo_labels")] for v, g in groups.items()}
  stats = {v: s for v, s in stats.items() if s}
  if not stats:
    return False
  panels = [("precision", "precision"), ("recall", "recall"), ("mask_rate", "mask rate"),
            ("estimated", "estimated class distribution")]
  num_classes = max(len(s[0]["precision"]) for s in stats.values())
  fig = Figure(figsize=(min(max(8.0, 0.35 * num_classes * len(stats)), 40.0), 3.0 * len(panels)))
  axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
  x, width = np.arange(num_classes), 0.8 / len(stats)
  for ax, (key, label) in zip(axes, panels):
    for i, (color, (variant, s)) in enumerate(zip(_colors(len(stats)), stats.items())):
      with warnings.catch_warnings():  # a class no seed pseudo-labelled: nan, drawn as no bar
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmean(np.array([r[key] for r in s], np.float64), axis=0)
      ax.bar(x - 0.4 + (i + 0.5) * width, values, width, color=color, label=variant)
    if key == "estimated":  # the truth is the same for every variant of a seed
      ax.step(x, np.array(next(iter(stats.values()))[0]["true"], np.float64), where="mid", color="black",
              linestyle="--", label="true (unlabeled data)")
    ax.set(ylabel=label, ylim=(0, 1.05))
  axes[0].set_title("Pseudo-labels over the last evaluation interval (mean over seeds)")
  axes[-1].set_xlabel("class")
  axes[-1].legend(fontsize=7, ncol=min(len(stats) + 1, 4))
  _save(fig, path)
  return True


def plot_schedules(groups: dict[str, list[SeedRun]], path: str, num_points: int = 200) -> bool:
  """The curve of every swept schedule for each variant that changes it (black dashes: the others' base curve).

  Returns False (and writes nothing) when no variant changes a schedule.
  """
  runs = [g[0] for g in groups.values() if g[0].config is not None]
  paths = list(dict.fromkeys(p for run in runs for p in swept_schedules(run)))
  if not paths:
    return False
  cols = min(len(paths), 3)
  rows = -(-len(paths) // cols)
  fig = Figure(figsize=(5.0 * cols, 3.8 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  color_of = dict(zip(groups, _colors(len(groups))))
  for ax, sched in zip(axes, paths):
    base_drawn = False
    for run in runs:
      swept = sched in swept_schedules(run)
      if not swept and base_drawn:
        continue
      total, spe = run.config["train"]["total_steps"], run.config["train"]["steps_per_epoch"]
      steps = np.unique(np.linspace(0, total - 1, num_points).round().astype(np.int64))  # the trained steps
      values = schedules.sample(_lookup(run.config, sched), total, spe, steps)
      if swept:
        ax.plot(steps, values, color=color_of[run.variant], label=run.variant)
      else:
        ax.plot(steps, values, color="black", linestyle="--", linewidth=1.0, label="others (base)")
        base_drawn = True
    ax.set(title=sched, xlabel="step", ylabel="value")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[len(paths):]:
    ax.set_visible(False)
  _save(fig, path)
  return True


def _bank_mean(key: str):
  return lambda record: float(np.mean(record[key]))


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
  plot_metric_curves(groups, files.join(workdir, PLOTS["balanced_acc"]),
                     [("Test balanced accuracy (reported head)", "balanced accuracy (%)",
                       lambda r: _head(r)["balanced_acc"])])
  plot_metric_curves(groups, files.join(workdir, PLOTS["bank"]),
                     [("Memory bank: mean confidence", "confidence", _bank_mean("bank_confidence")),
                      ("Memory bank: fill", "filled fraction", _bank_mean("bank_fill"))])
  plot_per_class(groups, files.join(workdir, PLOTS["per_class"]))
  names = ["balanced_acc", "bank", "per_class"]
  if plot_paired(rows, files.join(workdir, PLOTS["paired"])):
    names.append("paired")
  if plot_pseudo_labels(groups, files.join(workdir, PLOTS["pseudo_labels"])):
    names.append("pseudo_labels")
  if plot_schedules(groups, files.join(workdir, PLOTS["schedules"])):
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
