"""Report tables and plots from hand-written run directories (eval.jsonl, summary.json, sweep_variant.json)."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from configs import test as test_config
from semi_jax import files, metrics, report, report_plots, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(step, balanced, many=0.0, medium=0.0, few=0.0, acc=0.0, per_class=(0.0, 0.0, 0.0), fill=0.5,
            confidence=0.9):
  head = {"acc": acc, "balanced_acc": balanced, "acc_many": many, "acc_medium": medium, "acc_few": few,
          "per_class": list(per_class)}
  # The standard head gets other numbers: the report must read the reported (balanced) head only.
  other = {k: (-1.0 if not isinstance(v, list) else [-1.0] * len(v)) for k, v in head.items()}
  return {"step": step, "reported": "balanced", "loss_b": 1.0, "balanced": head, "standard": other,
          "bank_fill": [fill, fill], "bank_confidence": [confidence, confidence]}


def _write_run(workdir, variant, seed, records, index=0, overrides=None, finished=True, extra_lines=()):
  """A run directory as semi_jax.sweep and semi_jax.train leave it (through semi_jax.files: local or ram://)."""
  run_dir = files.join(workdir, variant, f"seed_{seed}")
  files.makedirs(run_dir)
  with files.open(files.join(run_dir, report.EVAL_LOG), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line)
  if finished:
    files.write_json_atomic(files.join(run_dir, sweep.SUMMARY),
                            {"step": records[-1]["step"], "balanced_acc": records[-1]["balanced"]["balanced_acc"]})
  overrides = overrides or {}
  config = sweep.apply_overrides(test_config.get_config(), overrides)
  files.write_json_atomic(files.join(run_dir, sweep.VARIANT_FILE),
                          {"name": variant, "index": index, "seed": seed, "overrides": overrides,
                           "config": config.to_dict()})
  return run_dir


@pytest.fixture
def two_variants(tmp_path):
  return _write_two_variants(str(tmp_path))


def _write_two_variants(d):
  """'ref' (index 0, seeds 0 and 1, three evaluations) and 'beta' (index 1, one seed, a swept schedule)."""
  final0 = _record(6, 60.0, many=80.0, medium=40.0, few=10.0, acc=70.0, per_class=(90, 60, 30))
  final1 = _record(6, 70.0, many=90.0, medium=50.0, few=30.0, acc=75.0, per_class=(100, 70, 40))
  _write_run(d, "ref", 0, [_record(2, 50.0), _record(4, 62.0), final0])
  _write_run(d, "ref", 1, [_record(2, 55.0), _record(4, 71.0), final1])
  _write_run(d, "beta", 0, [_record(2, 40.0), _record(6, 45.0, many=60.0, medium=30.0, few=0.0, acc=50.0)],
             index=1, overrides={"bank.beta": {"kind": "linear", "value": 0.95, "end_value": 0.999}})
  return d


def _read_csv(path):
  with files.open(path) as f:
    return list(csv.DictReader(f))


def test_mean_std_over_seeds_by_hand(two_variants):
  written = report.make_report(two_variants, last_n=2)
  rows = _read_csv(written["csv"])
  assert [r["variant"] for r in rows] == ["ref", "beta"]  # sweep order (index), not alphabetical
  ref, beta = rows
  assert (ref["seeds"], ref["finished"], ref["steps"]) == ("2", "2", "6")
  expect = {  # (mean, sample std) of the two seeds' values
      "final_balanced_acc": (65.0, math.sqrt(50.0)),  # 60, 70
      "last_n_balanced_acc": (65.75, 9.5 / math.sqrt(2.0)),  # (62 + 60) / 2 = 61, (71 + 70) / 2 = 70.5
      "acc_many": (85.0, math.sqrt(50.0)), "acc_medium": (45.0, math.sqrt(50.0)),
      "acc_few": (20.0, math.sqrt(200.0)), "acc": (72.5, math.sqrt(12.5))}
  for name, (mean, std) in expect.items():
    assert float(ref[f"{name}_mean"]) == pytest.approx(mean, abs=1e-4), name
    assert float(ref[f"{name}_std"]) == pytest.approx(std, abs=1e-4), name
  assert float(ref["final_delta"]) == 0.0
  assert float(beta["final_balanced_acc_mean"]) == 45.0 and math.isnan(float(beta["final_balanced_acc_std"]))
  assert float(beta["last_n_balanced_acc_mean"]) == pytest.approx(42.5)
  assert float(beta["final_delta"]) == pytest.approx(45.0 - 65.0)
  assert ref["overrides"] == "(base)"
  assert beta["overrides"] == "bank.beta: linear 0.95→0.999 over steps 0..end"
  md = open(written["md"]).read()
  # No validation set in these runs: nothing selected, never the best test evaluation.
  assert math.isnan(float(ref["val_selected_balanced_acc_mean"]))
  row = ("| ref | 2 | 6 | 2 trained | 0 | 65.00 ± 7.07 | n/a | 65.75 ± 6.72 | 85.00 ± 7.07 | 45.00 ± 7.07 | "
         "20.00 ± 14.14 | n/a |")
  assert row in md, md
  assert "| beta | 1 | 6 | 1 trained | 0 | 45.00 | n/a | 42.50 |" in md and "| -20.00 |" in md
  assert "last-2 bal. acc" in md


def test_selection_by_validation_never_looks_at_the_test_set(tmp_path):
  """Test accuracy is reported at the evaluation with the best validation balanced accuracy: here step 4 (val
  80), whose test accuracy (55) is neither the best (70, step 6) nor the final one."""
  records = [_record(2, 50.0), _record(4, 55.0), _record(6, 70.0)]
  for r, val in zip(records, (60.0, 80.0, 75.0)):
    r["validation"] = {"balanced": {"balanced_acc": val}, "standard": {"balanced_acc": -1.0}}
  _write_run(str(tmp_path), "ref", 0, records)
  row = report.summarize(report.load_runs(str(tmp_path)), last_n=1)[0]
  assert row["val_selected_balanced_acc_mean"] == 55.0 and row["final_balanced_acc_mean"] == 70.0
  assert metrics.select_by_validation(records) == 1
  assert metrics.select_by_validation(records[:1] + [_record(8, 90.0)]) is None  # one record without validation
  records[2]["validation"]["balanced"]["balanced_acc"] = 80.0  # a tie: the later evaluation wins
  assert metrics.select_by_validation(records) == 2


def test_last_n_longer_than_the_run_averages_every_evaluation(two_variants):
  rows = report.summarize(report.load_runs(two_variants), last_n=50)
  assert rows[0]["last_n_balanced_acc_mean"] == pytest.approx(((50 + 62 + 60) / 3 + (55 + 71 + 70) / 3) / 2)


def test_plots_are_png_files(two_variants):
  written = report.make_report(two_variants)
  for name in ("balanced_acc", "bank", "per_class", "schedules"):
    with open(written[name], "rb") as f:
      data = f.read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name
  md = open(written["md"]).read()
  assert all(f"]({report.PLOTS[n]})" in md for n in ("balanced_acc", "bank", "per_class", "schedules"))


def test_report_of_a_sweep_on_ram_equals_the_local_one(two_variants, ram_dir):
  written = report.make_report(_write_two_variants(ram_dir), last_n=2)
  local = report.make_report(two_variants, last_n=2)
  assert set(written) == set(local) and all(p.startswith(ram_dir + "/") for p in written.values())
  assert _read_csv(written["csv"]) == _read_csv(local["csv"])
  assert files.read_text(written["md"]) == files.read_text(local["md"])
  for name in ("balanced_acc", "bank", "per_class", "schedules"):
    data = files.read_bytes(written[name])
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name
  plots = [p for n, p in report.PLOTS.items() if n != "pseudo_labels"]  # these runs recorded no pseudo-labels
  assert sorted(files.listdir(ram_dir)) == sorted(["beta", "ref", report.CSV_FILE, report.MD_FILE,
                                                     *plots])  # no temporary file left


def test_no_schedule_plot_without_a_swept_schedule(tmp_path):
  d = str(tmp_path)
  _write_run(d, "fixmatch", 0, [_record(2, 30.0)], overrides={"miner.enabled": False})
  written = report.make_report(d)
  assert "schedules" not in written and not os.path.exists(os.path.join(d, report.PLOTS["schedules"]))
  assert _read_csv(written["csv"])[0]["overrides"] == "miner.enabled=False"


def test_mean_curve_averages_the_seeds_that_reached_each_step(tmp_path):
  d = str(tmp_path)
  _write_run(d, "v", 0, [_record(2, 10.0), _record(4, 30.0)])
  _write_run(d, "v", 1, [_record(2, 20.0)], finished=False)
  group = report.group_by_variant(report.load_runs(d))["v"]
  steps, mean, std = report_plots.mean_curve(group, lambda r: r["balanced"]["balanced_acc"])
  assert steps.tolist() == [2, 4]
  assert mean.tolist() == pytest.approx([15.0, 30.0])
  assert std.tolist() == pytest.approx([math.sqrt(50.0), 0.0])
  row = report.summarize(report.load_runs(d))[0]
  assert (row["seeds"], row["finished"], row["steps"]) == (2, 1, 2)  # steps: the least advanced seed
  assert "(1*)" in report.markdown([row], 5, [])


def test_resumed_run_duplicate_steps_and_cut_lines(tmp_path):
  d = str(tmp_path)
  # A run resumed from an older checkpoint logs step 4 again; a killed run may leave half a line.
  _write_run(d, "v", 0, [_record(2, 10.0), _record(4, 99.0), _record(4, 40.0)], extra_lines=['{"step": 6, "rep'])
  evals = metrics.read_evals(os.path.join(d, "v", "seed_0", report.EVAL_LOG))
  assert [e["step"] for e in evals] == [2, 4]
  assert evals[-1]["balanced"]["balanced_acc"] == 40.0


def test_bank_curves_average_over_classes(tmp_path):
  d = str(tmp_path)
  record = _record(2, 10.0)
  record["bank_fill"], record["bank_confidence"] = [0.0, 1.0, 0.5], [0.3, 0.6, 0.9]
  _write_run(d, "v", 0, [record])
  group = report.group_by_variant(report.load_runs(d))["v"]
  assert report_plots.mean_curve(group, report_plots.bank_mean("bank_fill"))[1].tolist() == pytest.approx([0.5])
  assert report_plots.mean_curve(group, report_plots.bank_mean("bank_confidence"))[1].tolist() == pytest.approx([0.6])


def test_pending_variants_are_listed(two_variants):
  os.makedirs(os.path.join(two_variants, "late", "seed_0"))
  md = open(report.make_report(two_variants)["md"]).read()
  assert "No evaluation yet: late." in md
  assert [r["variant"] for r in _read_csv(os.path.join(two_variants, report.CSV_FILE))] == ["ref", "beta"]


def test_schedule_path():
  config = test_config.get_config().to_dict()
  assert sweep.schedule_path(config, "bank.beta.value") == "bank.beta"
  assert sweep.schedule_path(config, "bank.beta") == "bank.beta"
  assert sweep.schedule_path(config, "bank.enabled") is None
  assert sweep.schedule_path(config, "bank.missing.value") is None
  assert sweep.schedule_path(None, "bank.beta") is None


def test_bad_input_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    report.make_report(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="no run under .* has an evaluation yet"):
    report.make_report(str(tmp_path))
  with pytest.raises(ValueError, match="last_n=0 is invalid"):
    report.summarize([], last_n=0)


def _report_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "semi_jax.report", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)


def test_cli(two_variants, tmp_path):
  r = _report_cli(f"--workdir={two_variants}", "--last_n=2")
  assert r.returncode == 0, r.stderr
  assert "| ref | 2 | 6 |" in r.stdout and os.path.getsize(os.path.join(two_variants, report.CSV_FILE)) > 0
  r = _report_cli(f"--workdir={tmp_path / 'missing'}")
  assert r.returncode != 0 and "is not a directory" in r.stderr and "Traceback" not in r.stderr


def test_pseudo_label_columns_and_plot(tmp_path):
  """The last evaluation's pseudo-label statistics become columns (mean over seeds) and pseudo_labels.png."""
  d = str(tmp_path)
  for seed, (precision, tv) in enumerate([(0.8, 0.1), (0.6, 0.3)]):
    final = _record(4, 60.0, per_class=(90, 60, 30))
    final["pseudo_labels"] = {"precision": [precision, 0.5, float("nan")], "recall": [0.9, 0.5, 0.1],
                              "mask_rate": [0.9, 0.6, 0.2], "estimated": [0.6, 0.3, 0.1], "true": [0.5, 0.3, 0.2],
                              "tv_distance": tv, "macro_precision": precision, "macro_recall": 0.5}
    _write_run(d, "ref", seed, [_record(2, 50.0), final])
  written = report.make_report(d, last_n=1)
  row = _read_csv(written["csv"])[0]
  assert float(row["pl_macro_precision_mean"]) == pytest.approx(0.7)
  assert float(row["pl_tv_distance_mean"]) == pytest.approx(0.2)
  assert math.isnan(float(row["pl_macro_recall_std"])) or float(row["pl_macro_recall_std"]) == 0.0
  assert written["pseudo_labels"].endswith(report.PLOTS["pseudo_labels"])
  assert files.read_bytes(written["pseudo_labels"])[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"]({report.PLOTS['pseudo_labels']})" in files.read_text(written["md"])


def test_paired_statistics_by_hand(tmp_path):
  """Final balanced accuracies of three seeds; 'b' differs from 'ref' by +2.3, -0.3, +6.7 and 'c' by +3, +4, +5.
  b: mean 2.9, sample sd sqrt(12.52), t(0.975, 2) = 4.303 -> 2.9 -+ 4.303 * sqrt(12.52 / 3), two wins, the
  interval holds 0. c: 4 -+ 4.303 / sqrt(3), excludes 0."""
  d = str(tmp_path)
  ref, b, c = [90.0, 92.0, 94.0], [92.3, 91.7, 100.7], [93.0, 96.0, 99.0]
  for index, (name, values) in enumerate((("ref", ref), ("b", b), ("c", c))):
    for seed, v in enumerate(values):
      _write_run(d, name, seed, [_record(2, 10.0), _record(4, v)], index=index)
  rows = {r["variant"]: r for r in report.summarize(report.load_runs(d), last_n=1)}
  half_b = 4.303 * math.sqrt(12.52 / 3)
  assert rows["b"]["paired_metric"] == "final_balanced_acc"  # no validation set in these runs
  assert (rows["b"]["paired_n"], rows["b"]["paired_wins"]) == (3, 2)
  assert rows["b"]["paired_mean"] == pytest.approx(2.9)
  assert (rows["b"]["paired_ci_low"], rows["b"]["paired_ci_high"]) == pytest.approx((2.9 - half_b, 2.9 + half_b))
  assert not rows["b"]["paired_excludes_0"]
  half_c = 4.303 / math.sqrt(3)
  assert (rows["c"]["paired_ci_low"], rows["c"]["paired_ci_high"]) == pytest.approx((4 - half_c, 4 + half_c))
  assert rows["c"]["paired_excludes_0"] and rows["c"]["paired_wins"] == 3
  assert rows["ref"]["paired_mean"] == 0.0 and not rows["ref"]["paired_excludes_0"]
  written = report.make_report(d, last_n=1)
  md = files.read_text(written["md"])
  assert f"| +4.00 [{4 - half_c:+.2f}, {4 + half_c:+.2f}] * | 3/3 |" in md, md
  assert f"| +2.90 [{2.9 - half_b:+.2f}, {2.9 + half_b:+.2f}] | 2/3 |" in md
  assert files.read_bytes(written["paired"])[:8] == PNG_SIGNATURE
  # Another reference: its row comes first. c - b = +0.7, +4.3, -1.7: mean 1.1,
  # variance (0.16 + 10.24 + 7.84) / 2 = 9.12.
  rows = report.summarize(report.load_runs(d), last_n=1, reference="b")
  assert [r["variant"] for r in rows] == ["b", "ref", "c"] and rows[0]["paired_mean"] == 0.0
  half = 4.303 * math.sqrt(9.12 / 3)
  assert (rows[2]["paired_mean"], rows[2]["paired_ci_high"]) == pytest.approx((1.1, 1.1 + half))
  assert rows[2]["final_delta"] == pytest.approx(1.1) and rows[2]["paired_wins"] == 2
  assert rows[1]["paired_mean"] == pytest.approx(-2.9)
  with pytest.raises(ValueError, match=r"reference='d' is no variant with an evaluation here; choose one of "):
    report.summarize(report.load_runs(d), reference="d")
  r = _report_cli(f"--workdir={d}", "--last_n=1", "--reference=c")
  assert r.returncode == 0 and "| c | 3 | 4 |" in r.stdout and "Δ final is relative to c." in r.stdout, r.stderr
  assert report.t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)  # beyond the table
  assert report.t_quantile_975(30) == 2.042


def test_paired_statistics_on_pseudo_label_precision(tmp_path):
  """--paired_on=pl_precision compares the last interval's pseudo-label macro precision, in points: 'b' is
  better by 0.03, 0.04 and 0.05 -> 4 points, sd 1, 4 -+ 4.303 / sqrt(3); the accuracies play no part."""
  d = str(tmp_path)
  for index, (name, precisions) in enumerate((("ref", (0.80, 0.70, 0.90)), ("b", (0.83, 0.74, 0.95)))):
    for seed, precision in enumerate(precisions):
      final = _record(4, 50.0 - index)
      final["pseudo_labels"] = {"precision": [precision] * 3, "recall": [0.5] * 3, "mask_rate": [0.5] * 3,
                                "estimated": [0.4, 0.3, 0.3], "true": [0.5, 0.3, 0.2], "tv_distance": 0.1,
                                "macro_precision": precision, "macro_recall": 0.5}
      _write_run(d, name, seed, [_record(2, 10.0), final], index=index)
  rows = {r["variant"]: r for r in report.summarize(report.load_runs(d), last_n=1, paired_on="pl_precision")}
  half = 4.303 / math.sqrt(3)
  assert rows["b"]["paired_metric"] == "pl_macro_precision" and rows["b"]["paired_wins"] == 3
  assert (rows["b"]["paired_mean"], rows["b"]["paired_ci_low"]) == pytest.approx((4.0, 4.0 - half))
  assert rows["b"]["paired_excludes_0"]
  rows = {r["variant"]: r for r in report.summarize(report.load_runs(d), last_n=1, paired_on="pl_recall")}
  assert rows["b"]["paired_mean"] == 0.0 and rows["b"]["paired_wins"] == 0
  written = report.make_report(d, last_n=1, paired_on="pl_precision")
  md = files.read_text(written["md"])
  assert "of the pseudo-labels' macro precision over the last evaluation interval (in points: x100)" in md
  assert files.read_bytes(written["paired"])[:8] == PNG_SIGNATURE


def test_paired_statistics_use_the_validation_selection_when_every_run_has_one(tmp_path):
  d = str(tmp_path)
  for index, (name, tests) in enumerate((("ref", (80.0, 90.0)), ("b", (85.0, 70.0)))):
    records = [_record(2, tests[0]), _record(4, tests[1])]
    for r, val in zip(records, (60.0, 50.0) if name == "b" else (40.0, 50.0)):
      r["validation"] = {"balanced": {"balanced_acc": val}, "standard": {"balanced_acc": 0.0}}
    _write_run(d, name, 0, records, index=index)
  rows = {r["variant"]: r for r in report.summarize(report.load_runs(d), last_n=1)}
  # ref selected at step 4 (val 50): 90; b at step 2 (val 60): 85 -> -5 (the final accuracies would give -20).
  assert rows["b"]["paired_metric"] == "val_selected_balanced_acc" and rows["b"]["paired_mean"] == -5.0
  assert math.isnan(rows["b"]["paired_ci_low"])  # one seed: no interval
  # --paired_on chooses another per-seed statistic: final 70 - 90; mean of the last 2: 77.5 - 85.
  rows = {r["variant"]: r for r in report.summarize(report.load_runs(d), last_n=1, paired_on="final")}
  assert rows["b"]["paired_metric"] == "final_balanced_acc" and rows["b"]["paired_mean"] == -20.0
  rows = {r["variant"]: r for r in report.summarize(report.load_runs(d), last_n=2, paired_on="last_n")}
  assert rows["b"]["paired_metric"] == "last_n_balanced_acc" and rows["b"]["paired_mean"] == -7.5
  md = files.read_text(report.make_report(d, last_n=2, paired_on="last_n")["md"])
  assert "of the mean balanced accuracy of the last 2 evaluations, with a 95 % t-interval" in md
  assert "| -7.50 | 0/1 |" in md
  with pytest.raises(ValueError, match="paired_on='median' is invalid; choose one of best_val, final, last_n, pl_"):
    report.summarize(report.load_runs(d), paired_on="median")
  r = _report_cli(f"--workdir={d}", "--paired_on=final")
  assert r.returncode == 0 and "| -20.00 | 0/1 |" in r.stdout, r.stderr


def test_diverged_runs_are_counted_not_averaged(tmp_path):
  """A seed that diverged shows in the status column with its step; every statistic leaves it out. Skipped steps
  are summed over the seeds."""
  d = str(tmp_path)
  _write_run(d, "ref", 0, [_record(2, 50.0), _record(4, 60.0)])
  _write_run(d, "ref", 1, [_record(2, 54.0), _record(4, 70.0)])
  files.write_json_atomic(files.join(d, "ref", "seed_1", sweep.SUMMARY), {"step": 4, "skipped_steps": 3})
  _write_run(d, "hot", 0, [_record(2, 30.0), _record(4, 40.0)], index=1)
  bad = _write_run(d, "hot", 1, [_record(2, 10.0)], index=1)
  files.write_json_atomic(files.join(bad, sweep.SUMMARY), {"status": "diverged", "step": 3, "skipped_steps": 0})
  _write_run(d, "all_bad", 0, [], index=2, finished=False)
  files.write_json_atomic(files.join(d, "all_bad", "seed_0", sweep.SUMMARY), {"status": "diverged", "step": 1})
  rows = {r["variant"]: r for r in report.summarize(report.load_runs(d), last_n=2)}
  assert (rows["ref"]["status"], rows["ref"]["skipped_steps"]) == ("2 trained", 3)
  assert rows["hot"]["status"] == "1 trained, 1 diverged (seed 1 at step 3)" and rows["hot"]["seeds"] == 1
  assert rows["hot"]["final_balanced_acc_mean"] == 40.0  # the diverged seed's 10 % is not averaged in
  assert rows["all_bad"]["status"] == "1 diverged (seed 0 at step 1)"
  assert math.isnan(rows["all_bad"]["final_balanced_acc_mean"])
  written = report.make_report(d, last_n=2)
  table = files.read_text(written["md"])
  assert "| 1 trained, 1 diverged (seed 1 at step 3) |" in table and "No evaluation yet" not in table
  assert _read_csv(written["csv"])[0]["skipped_steps"] == "3"
