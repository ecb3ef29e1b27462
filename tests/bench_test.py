"""The benchmark script runs end to end on the tiny setting and writes a complete, valid JSON report.

In process the benchmarks run with `--cpu_fast_paths=off`: 'auto' would apply the fast paths' malloc settings to
the test process itself (they are process-wide). The command itself runs with 'auto' in a subprocess, from
another working directory."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from semi_jax.tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_PROCESS = ["--quick", "--cpu_fast_paths=off"]


def test_quick_bench_writes_valid_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main([*IN_PROCESS, "--steps=2", "--bank_calls=2", "--input_seconds=0.2", "--loop_steps=30",
              f"--out={out}"])
  result = json.loads(out.read_text())

  assert set(result["train_step"]) == {"semi", "acr", "fixmatch"}
  for algo, r in result["train_step"].items():
    assert r["algo"] == algo
    assert r["steps"] == 2
    assert r["images_per_step"] == 8 * 4  # labeled batch 8, mu 1: x + weak + 2 strong views
    assert r["compile_s"] > 0 and r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
    assert math.isclose(r["images_per_s"], r["images_per_step"] / (r["median_ms"] / 1000), rel_tol=1e-9)
    m = r["memory"]  # the donated state and the batch are arguments; the state comes back aliased to them
    assert 0 < m["alias_mb"] <= m["argument_mb"] and m["temp_mb"] > 0
    assert math.isclose(m["peak_mb"], m["argument_mb"] + m["output_mb"] - m["alias_mb"] + m["temp_mb"], rel_tol=1e-9)
  assert set(result["semi_extra_pct_of_step"]) == {"acr", "fixmatch"}
  assert [(r["classes"], r["size"], r["candidates"], r["dim"], r["dtype"]) for r in result["bank_update"]] == list(
      bench.QUICK_BANK_SIZES)
  assert all(r["push_ms"] > 0 and r["push_decay_ms"] > 0 for r in result["bank_update"])
  # features [C, K, D] in the bank's dtype, plus float32 confidences, int32 slots and two bool flags per entry
  for r, bytes_per_feature in zip(result["bank_update"], (4, 2)):
    entries = r["classes"] * r["size"]
    assert math.isclose(r["bank_mb"] * 2 ** 20, entries * (r["dim"] * bytes_per_feature + 4 + 4 + 2), rel_tol=1e-12)
  assert result["eval_step"]["batch"] == 32 and result["eval_step"]["median_ms"] > 0
  assert result["input_pipeline"]["weak_2strong_images_per_s"] > 0
  env = result["environment"]
  assert env["device_count"] >= 1 and env["jax"] and "xla_flags" in env
  assert env["cpu_fast_paths"] is False and env["compiler_options"] == {}
  loop = result["training_loop"]
  assert loop["steps"] == 30 and loop["devices"] == 8 and loop["ms_per_step"] > 0
  assert math.isclose(loop["steps_per_s"], 1000.0 / loop["ms_per_step"], rel_tol=1e-9)
  assert 0 < loop["loop_thread_cpu_ms_per_step"] and 0 < loop["synchronous_step_ms"]

  printed = capsys.readouterr().out
  for algo in ("semi", "acr", "fixmatch"):
    assert algo in printed
  assert "SeMi extra cost over fixmatch" in printed
  assert "training loop (semi_jax.train, trivial model, 8 device(s))" in printed


def test_the_command_runs_from_another_directory_with_the_cpu_fast_paths(tmp_path):
  """`python -m semi_jax.tools.bench` finds its default config by path, not as the `configs` package of the
  working directory; on CPUs 'auto' turns the fast paths on, compiler options included."""
  out = tmp_path / "bench.json"
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-m", "semi_jax.tools.bench", "--quick", "--algos=semi", "--steps=1",
                      "--bank_calls=1", "--input_seconds=0", "--loop_steps=0", f"--out={out}"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  env = json.loads(out.read_text())["environment"]
  assert env["cpu_fast_paths"] is True
  assert env["compiler_options"] == {"xla_cpu_experimental_ynn_fusion_type": "",
                                     "xla_cpu_experimental_onednn_custom_call": True}
  assert env["host_malloc"] == "one arena, no mmap, no trim"


def test_profile_summarises_the_traced_step(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main([*IN_PROCESS, "--steps=1", "--algos=semi", "--bank_calls=1", "--input_seconds=0", "--loop_steps=0",
              f"--profile={tmp_path / 'trace'}", f"--out={out}"])
  profile = json.loads(out.read_text())["train_step"]["semi"]["profile"]
  assert profile["step_wall_ms"] > 0 and profile["top_op_kinds_ms"]
  assert all(ms >= 0 and not kind[-1].isdigit() for kind, ms in profile["top_op_kinds_ms"].items())
  assert math.isclose(profile["attributed_ms"], sum(profile["top_op_kinds_ms"].values()), rel_tol=1e-9) or (
      profile["attributed_ms"] > sum(profile["top_op_kinds_ms"].values()))
  assert "profile of one semi step" in capsys.readouterr().out


def test_cost_only_compiles_a_resnet_step_without_running_it(tmp_path, capsys):
  """The ImageNet-127 config (ResNet-50) in its quick form: one bottleneck per stage at base width 4, 127 classes,
  a labeled batch of 2; FLOPs and memory of the compiled step only."""
  out = tmp_path / "bench.json"
  bench.main([*IN_PROCESS, "--algos=semi", f"--config={os.path.join(ROOT, 'configs', 'imagenet127.py')}:size=64",
              "--batch_size=2", "--cost_only", f"--out={out}"])
  result = json.loads(out.read_text())
  assert "train_step" not in result and "bank_update" not in result
  assert result["model"].startswith("resnet (1, 1, 1, 1) bottleneck, base width 4: ")
  assert "D = 128, 127 classes, 8x8 images, labeled batch 2, mu 1" in result["model"]
  r = result["train_step_cost"]["semi"]
  assert r["images_per_step"] == 2 * 4 and r["gflop_per_step"] > 0 and r["memory"]["peak_mb"] > 0
  assert "semi train step (8 images), compiled in" in capsys.readouterr().out


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="steps"):
    bench.run(steps=0, quick=True)
  with pytest.raises(ValueError, match="algos"):
    bench.run(steps=1, quick=True, algos=())
  with pytest.raises(ValueError, match="loop_steps"):
    bench.run(steps=1, quick=True, loop_steps=-1)


def test_fraction_of_a_given_peak(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main([*IN_PROCESS, "--steps=1", "--algos=semi", "--bank_calls=1", "--input_seconds=0", "--loop_steps=0",
              "--peak_tflops=0.5", f"--out={out}"])
  result = json.loads(out.read_text())
  r = result["train_step"]["semi"]
  assert result["peak_tflops"] == 0.5
  assert math.isclose(r["fraction_of_peak"], r["gflop_per_s"] / 500.0, rel_tol=1e-12)
  assert f"semi: {100 * r['fraction_of_peak']:.1f}% of the given peak of 0.5 TFLOP/s" in capsys.readouterr().out
  with pytest.raises(ValueError, match="peak_tflops must be > 0"):
    bench.run(steps=1, quick=True, peak_tflops=0)


def test_augmentation_benchmark_measures_the_device_views(capsys):
  from semi_jax.tools import bench_augment
  bench_augment.main(["--where=device", "--steps=0", "--seconds=0.1", "--size=8", "--batch=4", "--cpu_fast_paths=off"])
  printed = capsys.readouterr().out
  for views in bench_augment.VIEWS:
    assert re.search(rf"device cpu +views={re.escape(views)} +\d+ images/s +\d+ images/CPU-s", printed), printed
  with pytest.raises(SystemExit, match="--where takes host and/or device"):
    bench_augment.main(["--where=gpu"])
  with pytest.raises(ValueError, match="views must be"):
    bench_augment.measure_device("strong")


def test_together_benchmark_reports_every_run_count(tmp_path, capsys):
  from semi_jax.tools import bench_together
  out = tmp_path / "together.json"
  bench_together.main([f"--config={os.path.join(ROOT, 'configs', 'test.py')}", "--runs=1,3", "--seeds=1",
                       "--steps=1", f"--out={out}"])
  result = json.loads(out.read_text())
  assert [(r["runs"], r["conv"]) for r in result["stacked"]] == [(1, "per_run"), (3, "per_run")]
  three = result["stacked"][1]
  assert three["traced"] == ["bank.beta"] and three["mesh"]["run"] * three["mesh"]["data"] == result["devices"]
  assert three["run_steps_per_s"] == pytest.approx(3 / (three["step_ms"] / 1000.0))
  assert three["x_alone"] == pytest.approx(three["run_steps_per_s"] / result["alone"]["float32"]["run_steps_per_s"])
  assert three["padded_runs"] % three["mesh"]["run"] == 0 and three["peak_mb_per_run"] > 0
  assert "| 3 |" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    bench_together.main(["--runs=1,2", "--seeds=3"])
  with pytest.raises(SystemExit):
    bench_together.main(["--runs=1", "--conv=loop"])


def test_accelerator_report_runs_its_whole_path_quickly(tmp_path):
  """The one command an accelerator machine runs, on the CPU with the tiny config: every section is measured,
  written as JSON and markdown, within its time budget."""
  from semi_jax.tools import accelerator_report
  report = accelerator_report.measure(str(tmp_path), budget_s=600, quick=True, log=lambda line: None)
  assert set(report["alone"]) == {"float32", "bfloat16"} and not report["skipped"]
  settings = {(r["setting"], r["dtype"], r["conv"], r["runs"]) for r in report["stacked"]}
  assert settings == {("wrn", d, c, 3) for d in ("float32", "bfloat16") for c in ("grouped", "per_run")}
  for r in report["stacked"]:
    alone = report["alone"][r["dtype"]]
    assert r["x_alone"] == pytest.approx(r["run_steps_per_s"] * alone["step_ms"] / 1000.0)
  assert report["augmentation"]["share_pct"] > 0
  assert set(report["fastest"]) == {"wrn float32 x3", "wrn bfloat16 x3"}
  written = json.loads((tmp_path / "accelerator_report.json").read_text())
  assert written["stacked"] == report["stacked"]
  markdown = (tmp_path / "accelerator_report.md").read_text()
  assert "## Stacked runs" in markdown and "## Fastest formulation" in markdown
  assert accelerator_report.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert accelerator_report.peak_tflops("cpu", "float32") is None
  # A budget that is spent at once measures nothing and says so.
  spent = accelerator_report.measure(str(tmp_path / "spent"), budget_s=0, quick=True, log=lambda line: None)
  assert not spent["stacked"] and "alone float32" in spent["skipped"]


class _Analysed:
  def __init__(self, cost):
    self.cost = cost

  def cost_analysis(self):
    return self.cost


def test_flops_come_from_the_lowered_program_else_from_the_compiled_one():
  # XLA:CPU analyses the lowered program (its compiled one hides convolutions in oneDNN calls); jax 0.11's GPU
  # backend gave no analysis of the lowered program, so the compiled one's is the fallback.
  assert bench.compiled_flops(_Analysed({"flops": 5.0}), _Analysed({"flops": 7.0})) == 5.0
  assert bench.compiled_flops(_Analysed(None), _Analysed([{"flops": 7.0}])) == 7.0
  assert bench.compiled_flops(_Analysed({}), _Analysed({"flops": 0.0})) is None
  assert bench.compiled_flops(_Analysed([]), None) is None
