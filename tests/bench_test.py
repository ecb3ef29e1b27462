"""The benchmark script runs end to end on the tiny setting and writes a complete, valid JSON report."""
import json
import math

import pytest

from semi_jax import bench


def test_quick_bench_writes_valid_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--steps=2", "--bank_calls=2", "--input_seconds=0.2", f"--out={out}"])
  result = json.loads(out.read_text())

  assert set(result["train_step"]) == {"semi", "acr", "fixmatch"}
  for algo, r in result["train_step"].items():
    assert r["algo"] == algo
    assert r["steps"] == 2
    assert r["images_per_step"] == 8 * 4  # labeled batch 8, mu 1: x + weak + 2 strong views
    assert r["compile_s"] > 0 and r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
    assert math.isclose(r["images_per_s"], r["images_per_step"] / (r["median_ms"] / 1000), rel_tol=1e-9)
  assert set(result["semi_extra_pct_of_step"]) == {"acr", "fixmatch"}
  assert [(r["classes"], r["size"], r["candidates"]) for r in result["bank_update"]] == list(
      bench.QUICK_BANK_SIZES)
  assert all(r["push_ms"] > 0 and r["push_decay_ms"] > 0 for r in result["bank_update"])
  assert result["eval_step"]["batch"] == 32 and result["eval_step"]["median_ms"] > 0
  assert result["input_pipeline"]["weak_2strong_images_per_s"] > 0
  env = result["environment"]
  assert env["device_count"] >= 1 and env["jax"] and "xla_flags" in env

  printed = capsys.readouterr().out
  for algo in ("semi", "acr", "fixmatch"):
    assert algo in printed
  assert "SeMi extra cost over fixmatch" in printed


def test_profile_summarises_the_traced_step(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--steps=1", "--algos=semi", "--bank_calls=1", "--input_seconds=0",
              f"--profile={tmp_path / 'trace'}", f"--out={out}"])
  profile = json.loads(out.read_text())["train_step"]["semi"]["profile"]
  assert profile["step_wall_ms"] > 0 and profile["top_op_kinds_ms"]
  assert all(ms >= 0 and not kind[-1].isdigit() for kind, ms in profile["top_op_kinds_ms"].items())
  assert math.isclose(profile["attributed_ms"], sum(profile["top_op_kinds_ms"].values()), rel_tol=1e-9) or (
      profile["attributed_ms"] > sum(profile["top_op_kinds_ms"].values()))
  assert "profile of one semi step" in capsys.readouterr().out


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="steps"):
    bench.run(steps=0, quick=True)
  with pytest.raises(ValueError, match="algos"):
    bench.run(steps=1, quick=True, algos=())


def test_fraction_of_a_given_peak(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--steps=1", "--algos=semi", "--bank_calls=1", "--input_seconds=0", "--peak_tflops=0.5",
              f"--out={out}"])
  result = json.loads(out.read_text())
  r = result["train_step"]["semi"]
  assert result["peak_tflops"] == 0.5
  assert math.isclose(r["fraction_of_peak"], r["gflop_per_s"] / 500.0, rel_tol=1e-12)
  assert f"semi: {100 * r['fraction_of_peak']:.1f}% of the given peak of 0.5 TFLOP/s" in capsys.readouterr().out
  with pytest.raises(ValueError, match="peak_tflops must be > 0"):
    bench.run(steps=1, quick=True, peak_tflops=0)
