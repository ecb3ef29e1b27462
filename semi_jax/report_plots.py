"""The plots of a sweep report (semi_jax.report): curves over steps with a band over seeds, per-class bars, the
paired differences and the swept schedules, drawn on matplotlib's Agg canvas (no display, no pyplot state) and
written through semi_jax.files (so to gs:// too)."""
from __future__ import annotations

from collections.abc import Sequence
import io
from typing import TYPE_CHECKING
import warnings

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from semi_jax import files, metrics, schedules, sweep

if TYPE_CHECKING:
  from semi_jax.report import SeedRun


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
  num_classes = max(len(metrics.reported_head(run.evals[-1])["per_class"]) for g in groups.values() for run in g)
  width = 0.8 / len(groups)
  fig = Figure(figsize=(min(max(8.0, 0.35 * num_classes * len(groups)), 40.0), 4.5))
  ax = fig.subplots()
  x = np.arange(num_classes)
  for i, (color, (variant, group)) in enumerate(zip(_colors(len(groups)), groups.items())):
    accs = np.array([metrics.reported_head(run.evals[-1])["per_class"] for run in group], np.float64)
    std = np.std(accs, axis=0, ddof=1) if len(group) > 1 else None
    ax.bar(x - 0.4 + (i + 0.5) * width, np.mean(accs, axis=0), width, yerr=std, color=color, label=variant,
           error_kw={"elinewidth": 0.6})
  ax.set(title="Final per-class test accuracy (reported head, mean over seeds)", xlabel="class",
         ylabel="accuracy (%)", ylim=(0, 105))
  ax.set_xticks(x if num_classes <= 40 else x[::max(num_classes // 20, 1)])
  ax.legend(fontsize=7, ncol=min(len(groups), 4))
  _save(fig, path)


def plot_paired(rows: Sequence[dict], path: str, label: str) -> bool:
  """Every variant's mean paired difference from the reference with its 95 % interval (a dot alone for one
  seed), a line at 0; `label` names the statistic compared. False (nothing written) when there is no variant
  besides the reference."""
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
  ax.set(title=f"Paired Δ from {rows[0]['variant']}, {label} (95 % CI; red: excludes 0)",
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
  swept_by_run = [sweep.swept_schedules(run.config, run.overrides) for run in runs]
  paths = list(dict.fromkeys(p for swept in swept_by_run for p in swept))
  if not paths:
    return False
  cols = min(len(paths), 3)
  rows = -(-len(paths) // cols)
  fig = Figure(figsize=(5.0 * cols, 3.8 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  color_of = dict(zip(groups, _colors(len(groups))))
  for ax, sched in zip(axes, paths):
    base_drawn = False
    for run, swept_here in zip(runs, swept_by_run):
      swept = sched in swept_here
      if not swept and base_drawn:
        continue
      total, spe = run.config["train"]["total_steps"], run.config["train"]["steps_per_epoch"]
      steps = np.unique(np.linspace(0, total - 1, num_points).round().astype(np.int64))  # the trained steps
      values = schedules.sample(sweep.config_at(run.config, sched), total, spe, steps)
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


def bank_mean(key: str):
  """The mean over classes of a per-class memory-bank statistic of an evaluation record."""
  return lambda record: float(np.mean(record[key]))
