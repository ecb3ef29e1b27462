"""One command that measures what an accelerator machine is lent for: every figure semi_jax lacks without one.

  python -m semi_jax.tools.accelerator_report --out=DIR [--budget_s=420] [--peak_tflops=T] [--quick]

On the machine's first device (a GPU, a TPU chip, or the CPU), in this order, as long as the time budget lasts
(what is not started by then is listed as skipped, so the command ends in about --budget_s seconds):
  1. one run alone, WRN-28-2 at 32x32 (configs/cifar10_lt.py, 64 + 3 x 64 images), float32 and bfloat16: step
     time, images/s, XLA's FLOP count, TFLOP/s and the fraction of the chip's peak, device memory;
  2. stacked runs (`semi_jax.tools.bench_together`), WRN-28-2 and the embedded digits config, for each formulation
     of the stacked step (`together.conv`: grouped, per_run; on GPUs also per_run with the kernels of independent
     runs overlapping, `together.overlap`), at 9 runs first, then 27, 3 and 1, float32 and bfloat16: run-steps/s
     against the run alone, fraction of peak, memory per run;
  3. the device augmentation's share of the run-alone step (`data.augment_on=device`).
It writes DIR/accelerator_report.json (every figure, the device, the versions) and DIR/accelerator_report.md (the
tables, and which formulation measured fastest per setting: the value for `program.AUTO_CONV` on this platform).
`--quick` runs the same code path with the tiny test config and a few steps (the test suite runs it on the CPU,
so the command cannot rot between visits to an accelerator).
"""
from __future__ import annotations

import argparse
import os
import time

import jax

from semi_jax import config_files, files
from semi_jax import program as program_lib
from semi_jax.tools import bench, bench_augment, bench_together

# Dense peak TFLOP/s per device kind (data sheets) for float32 as XLA runs it by default (TF32 tensor cores on
# NVIDIA GPUs; bfloat16 passes on TPUs) and for bfloat16. Unknown kinds: no fraction (pass --peak_tflops).
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"float32": 494.7, "bfloat16": 989.4},
    "NVIDIA H100": {"float32": 494.7, "bfloat16": 989.4},
    "NVIDIA H200": {"float32": 494.7, "bfloat16": 989.4},
    "NVIDIA A100-SXM4-80GB": {"float32": 156.0, "bfloat16": 312.0},
    "NVIDIA A100-SXM4-40GB": {"float32": 156.0, "bfloat16": 312.0},
    "TPU v4": {"float32": 275.0, "bfloat16": 275.0},
    "TPU v5 lite": {"float32": 197.0, "bfloat16": 197.0},
    "TPU v5e": {"float32": 197.0, "bfloat16": 197.0},
    "TPU v5p": {"float32": 459.0, "bfloat16": 459.0},
    "TPU v6 lite": {"float32": 918.0, "bfloat16": 918.0},
}
DTYPES = ("float32", "bfloat16")
RUN_COUNTS = (9, 27, 3, 1)  # the target figure first


def peak_tflops(device_kind: str, dtype: str, given: float | None = None) -> float | None:
  """The peak TFLOP/s of `device_kind` for `dtype` (`given` overrides; None where unknown)."""
  if given:
    return given
  for kind, peaks in PEAK_TFLOPS.items():
    if device_kind.startswith(kind):
      return peaks[dtype]
  return None


def _settings(quick: bool) -> dict:
  """The config files measured: (label, config spec) of the WRN-28-2 and the digits setting, run counts, steps."""
  if quick:  # the same code path with one tiny setting
    return {"configs": [("wrn", config_files.repo_config("test"))], "counts": (3,), "steps": 1, "alone_steps": 1}
  return {"configs": [("wrn", config_files.repo_config("cifar10_lt")),
                      ("digits", config_files.repo_config("digits_lt"))],
          "counts": RUN_COUNTS, "steps": 10, "alone_steps": 20}


def _formulations(platform: str) -> list[tuple[str, str]]:
  """(together.conv, together.overlap) settings worth measuring on `platform`."""
  forms = [("grouped", "off"), ("per_run", "off")]
  if platform == "gpu":
    forms.append(("per_run", "on"))
  return forms


def measure(out_dir: str, budget_s: float, quick: bool = False, given_peak: float | None = None,
            log=print) -> dict:
  """Runs every measurement that fits in `budget_s` seconds; writes and returns the report (see the module
  docstring)."""
  deadline = time.monotonic() + budget_s
  settings = _settings(quick)
  device = jax.devices()[0]
  platform = program_lib.platform_family({d.platform for d in jax.devices()})
  report = {"device_kind": device.device_kind, "platform": platform, "devices": jax.device_count(),
            "environment": bench.environment(), "quick": quick, "budget_s": budget_s, "alone": {}, "stacked": [],
            "augmentation": None, "skipped": []}
  files.makedirs(out_dir)

  def save():
    files.write_json_atomic(os.path.join(out_dir, "accelerator_report.json"), report)
    files.write_text_atomic(os.path.join(out_dir, "accelerator_report.md"), format_markdown(report))

  def left() -> bool:
    return time.monotonic() < deadline

  def with_peak(entry: dict, dtype: str, gflop, ms) -> dict:
    peak = peak_tflops(device.device_kind, dtype, given_peak)
    tflops = None if gflop is None else gflop / ms  # GFLOP per ms = TFLOP/s
    entry.update(tflop_per_s=tflops, peak_tflops=peak,
                 fraction_of_peak=None if tflops is None or peak is None else tflops / peak)
    return entry

  # 1. One run alone, both dtypes.
  wrn = dict(settings["configs"])["wrn"]
  for dtype in DTYPES:
    if not left():
      report["skipped"].append(f"alone {dtype}")
      continue
    config = config_files.load(wrn)
    config.model.dtype = dtype
    r = bench.time_train_step(config, settings["alone_steps"])
    report["alone"][dtype] = with_peak(
        {"step_ms": r["median_ms"], "images_per_s": r["images_per_s"], "gflop_per_step": r["gflop_per_step"],
         "compile_s": r["compile_s"], "peak_mb": r["memory"].get("peak_mb"), "views_on_device": r["views_on_device"]},
        dtype, r["gflop_per_step"], r["median_ms"])
    log(f"alone {dtype}: {r['median_ms']:.2f} ms")
    save()

  # 2. Stacked runs: the 9-run figures of every setting first, then the other run counts.
  alone_cache = {("wrn", dtype): {"run_steps_per_s": 1000.0 / r["step_ms"], "step_ms": r["step_ms"]}
                 for dtype, r in report["alone"].items()}
  for runs in settings["counts"]:
    for label, spec in settings["configs"]:
      for dtype in DTYPES:
        for conv, overlap in _formulations(platform):
          if not left():
            report["skipped"].append(f"{label} {dtype} {conv} overlap {overlap} x{runs}")
            continue
          key = (label, dtype)
          if key not in alone_cache:
            alone_cache[key] = bench_together.time_alone(spec, settings["alone_steps"], dtype)
          alone = alone_cache[key]
          r = bench_together.time_stacked(spec, runs, 1, settings["steps"], conv, overlap, dtype)
          r.update(setting=label, x_alone=r["run_steps_per_s"] / alone["run_steps_per_s"],
                   alone_step_ms=alone["step_ms"])
          report["stacked"].append(with_peak(r, dtype, r["gflop_per_step"], r["step_ms"]))
          log(f"{label} {dtype} {conv} overlap {overlap} x{runs}: {r['step_ms']:.2f} ms, {r['x_alone']:.2f}x alone")
          save()

  # 3. The device augmentation's share of the step (the run alone, float32, views made in the step).
  if left():
    config = config_files.load(wrn)
    config.data.augment_on = "device"
    a = bench_augment.time_augmentation(config, settings["alone_steps"])
    step = report["alone"].get("float32")
    if step is None or not step["views_on_device"]:
      step = {"step_ms": bench.time_train_step(config, settings["alone_steps"])["median_ms"]}
    report["augmentation"] = dict(a, step_ms=step["step_ms"], share_pct=100.0 * a["augment_ms"] / step["step_ms"])
  else:
    report["skipped"].append("augmentation share")
  report["fastest"] = fastest(report)
  save()
  return report


def fastest(report: dict) -> dict:
  """Per (setting, dtype, runs): the formulation with the most run-steps/s."""
  best = {}
  for r in report["stacked"]:
    key = f"{r['setting']} {r['dtype']} x{r['runs']}"
    name = r["conv"] + (" + overlap" if r["overlap"] else "")
    if key not in best or r["run_steps_per_s"] > best[key]["run_steps_per_s"]:
      best[key] = {"formulation": name, "run_steps_per_s": r["run_steps_per_s"], "x_alone": r["x_alone"]}
  return best


def _fmt(v, spec: str = ".2f") -> str:
  return "-" if v is None else format(v, spec)


def format_markdown(report: dict) -> str:
  env = report["environment"]
  lines = [f"# Accelerator report: {report['devices']} x {report['device_kind']} ({report['platform']})", "",
           f"jax {env['jax']} (jaxlib {env['jaxlib']}), python {env['python']}, {env['cpu_count']} host cores"
           + (" — quick check (tiny config, not a measurement)" if report["quick"] else ""), "",
           "## One run alone: WRN-28-2, 32x32, 64 labeled + 3 x 64 unlabeled images per step", "",
           "| dtype | step (ms) | images/s | GFLOP/step | TFLOP/s | % of peak | MB |", "|---|---|---|---|---|---|---|"]
  for dtype, r in report["alone"].items():
    pct = None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"]
    lines.append(f"| {dtype} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} | {_fmt(r['gflop_per_step'], '.1f')} | "
                 f"{_fmt(r['tflop_per_s'], '.1f')} | {_fmt(pct, '.1f')} | {_fmt(r['peak_mb'], '.0f')} |")
  lines += ["", "## Stacked runs (`python -m semi_jax.tools.bench_together`)", "",
            "| setting | dtype | conv | overlap | runs | step (ms) | run-steps/s | x alone | % of peak | MB per run | "
            "compile (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(report["stacked"], key=lambda r: (r["setting"], r["dtype"], r["runs"], r["conv"], r["overlap"])):
    pct = None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"]
    lines.append(f"| {r['setting']} | {r['dtype']} | {r['conv']} | {'on' if r['overlap'] else 'off'} | {r['runs']} | "
                 f"{r['step_ms']:.2f} | {r['run_steps_per_s']:.1f} | {r['x_alone']:.2f} | {_fmt(pct, '.1f')} | "
                 f"{_fmt(r['peak_mb_per_run'], '.0f')} | {r['compile_s']:.0f} |")
  a = report.get("augmentation")
  if a:
    lines += ["", "## Device augmentation", "",
              f"The step's augmentation alone: {a['augment_ms']:.2f} ms, {a['share_pct']:.1f} % of the "
              f"{a['step_ms']:.2f} "
              f"ms step ({a['device_source_images_per_s']:.0f} source images/s)."]
  best = report.get("fastest") or {}
  if best:
    lines += ["", "## Fastest formulation", ""] + [
        f"- {k}: {v['formulation']} ({v['run_steps_per_s']:.1f} run-steps/s, {v['x_alone']:.2f}x alone)"
        for k, v in sorted(best.items())]
  if report["skipped"]:
    lines += ["", f"Not measured within the {report['budget_s']:.0f} s budget: " + "; ".join(report["skipped"])]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory for accelerator_report.json and .md")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="seconds after which no new measurement starts (the command ends soon after)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's peak TFLOP/s (default: the data-sheet figure of known devices)")
  parser.add_argument("--quick", action="store_true", help="the tiny test config: checks that the command runs")
  args = parser.parse_args(argv)
  from semi_jax import startup
  startup.prepare("auto")
  report = measure(args.out, args.budget_s, args.quick, args.peak_tflops)
  print(format_markdown(report))
  print("wrote " + ", ".join(os.path.join(args.out, n) for n in ("accelerator_report.json", "accelerator_report.md")))


if __name__ == "__main__":
  main()
