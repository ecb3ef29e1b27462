"""Speed of runs trained together (semi_jax.together): run-steps per second against the number of stacked runs.

  python -m semi_jax.tools.bench_together [--config=configs/digits_lt.py] [--runs=1,3,9,27] [--steps=10]
                                          [--seeds=1] [--conv=auto] [--overlap=auto] [--dtype=float32]
                                          [--out=bench_together.json]

For every run count R, R runs of the config that differ in a traced hyper-parameter (the bank's confidence decay
bank.beta, as the decay sweep does; with --seeds=S they are spread over S seeds, so S input streams) are stacked
into one program on all devices (`together.choose_axes`), and its train step is timed on synthetic batches
(random uint8 images; the step's cost does not depend on them). `--conv` lists the formulations of the stacked
step to time (grouped, per_run, auto: `together.conv`), `--overlap` the GPU kernel-overlap settings
(`together.overlap`), `--dtype` the model dtypes. Reported per setting and R: the step time, run-steps per second
(R / step time) and its ratio to the same config trained alone (`semi_jax.train`'s own program, measured in the
same process), the time per run-step, XLA's FLOP count and the device memory of the compiled step per run
(`memory_analysis`: the donated state, the batches, outputs and temporaries). Default setting:
configs/digits_lt.py (WRN-10-2, 16x16, batch 32 + 3 x 64 views); --config=configs/cifar10_lt.py for WRN-28-2 at
32x32.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from semi_jax import config_files, datasets, files, sharding, together
from semi_jax import program as program_lib
from semi_jax.tools import bench

WARMUP_STEPS = 2


def _configs(spec: str, runs: int, seeds: int, conv: str = "auto", overlap: str = "auto", dtype: str | None = None):
  """`runs` configs of `spec` whose bank.beta differs (0.95 .. 0.999), over `seeds` seeds."""
  configs = []
  for r in range(runs):
    config = config_files.load(spec)
    config.bank.beta.value = float(0.95 + 0.049 * r / max(runs - 1, 1))
    config.seed = r % seeds
    config.together.conv, config.together.overlap = conv, overlap
    config.model.dtype = dtype or config.model.dtype
    configs.append(config)
  return configs


def time_stacked(spec: str, runs: int, seeds: int, steps: int, conv: str = "auto", overlap: str = "auto",
                 dtype: str | None = None) -> dict:
  """Step time, throughput, FLOPs and memory of `runs` stacked runs on all devices."""
  configs = _configs(spec, runs, seeds, conv, overlap, dtype)
  config = configs[0]
  num_classes = datasets.num_classes(config.data.name)
  r_axis, d_axis = together.axes_for(config, jax.device_count(), runs,
                                     platform=program_lib.platform_family({d.platform for d in jax.devices()}))
  mesh = together.make_mesh(r_axis, d_axis)
  padded = together.padded_runs(runs, mesh)
  program = program_lib.build_program(config, mesh, runs=padded, num_classes=num_classes,
                                      class_prior=bench.long_tail_prior(num_classes), mean=np.full(3, 0.5, np.float32),
                                      std=np.full(3, 0.25, np.float32))
  inputs, varying = together.stack_inputs(configs, mesh)
  state = program.init_state(together.init_keys(configs, mesh))
  past_warmup = config.train.steps_per_epoch * (config.ssl.est_epoch + 1)  # every SeMi term live
  state = state.replace(step=sharding.from_host_values(np.full((padded,), past_warmup, np.int32),
                                                       NamedSharding(mesh, P(together.RUN_AXIS))))
  carry = program.init_carry()
  rng = np.random.default_rng(0)
  spec_batch = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
  batches = []
  for _ in range(2):
    local = [bench.synthetic_batch(rng, config, num_classes, views_on_device=program.views_on_device)
             for _ in range(seeds)]
    batches.append({k: jax.device_put(np.stack([b[k] for b in local]), spec_batch) for k in local[0]})
  start = time.perf_counter()
  lowered = program.train_step.lower(state, carry, batches[0], inputs)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(WARMUP_STEPS + steps):
    t0 = time.perf_counter()
    state, carry = compiled(state, carry, batches[i % 2], inputs)
    jax.block_until_ready(state)
    if i >= WARMUP_STEPS:
      times.append(time.perf_counter() - t0)
  host = jax.device_get(carry["metrics"])
  loss = [float(jax.tree.map(lambda x: x[r], host).compute()["loss"]) for r in range(padded)]
  if not np.all(np.isfinite(loss)):
    raise FloatingPointError(f"{runs} stacked runs of {spec} ({program.conv}) gave a non-finite loss {loss}.")
  ms = 1000.0 * float(np.median(times))
  memory = bench.compiled_memory(compiled)
  flops = bench.compiled_flops(lowered, compiled)
  return {"runs": runs, "padded_runs": padded, "seeds": seeds, "mesh": {"run": r_axis, "data": d_axis},
          "conv": program.conv, "overlap": bool(program_lib.overlap_options(overlap, {d.platform for d in
                                                                                     jax.devices()})),
          "dtype": config.model.dtype, "traced": list(varying), "compile_s": compile_s, "step_ms": ms,
          "run_steps_per_s": runs / (ms / 1000.0), "ms_per_run_step": ms / runs,
          "gflop_per_step": None if flops is None else flops / 1e9,
          "peak_mb_per_run": memory.get("peak_mb", float("nan")) / runs, "memory": memory}


def time_alone(spec: str, steps: int, dtype: str | None = None) -> dict:
  """The same config trained alone (semi_jax.train's program on one device), as the baseline."""
  config = config_files.load(spec)
  config.model.dtype = dtype or config.model.dtype
  result = bench.time_train_step(config, steps, datasets.num_classes(config.data.name))
  return {"dtype": config.model.dtype, "step_ms": result["median_ms"],
          "run_steps_per_s": 1000.0 / result["median_ms"], "compile_s": result["compile_s"],
          "gflop_per_step": result["gflop_per_step"], "peak_mb": result["memory"].get("peak_mb", float("nan"))}


def run(spec: str, counts: list[int], seeds: int = 1, steps: int = 10, convs=("auto",), overlaps=("auto",),
        dtypes=(None,), deadline: float | None = None) -> dict:
  """Every measurement as one JSON-serialisable dict; with `deadline` (a time.monotonic() value), the settings
  not started by then are left out (listed under "skipped")."""
  result = {"config": spec, "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "seeds": seeds, "alone": {},
            "stacked": [], "skipped": []}
  for dtype in dtypes:
    alone = time_alone(spec, steps, dtype)
    result["alone"][alone["dtype"]] = alone
    for conv in convs:
      for overlap in overlaps:
        for runs in counts:
          if deadline is not None and time.monotonic() > deadline:
            result["skipped"].append({"runs": runs, "conv": conv, "overlap": overlap, "dtype": alone["dtype"]})
            continue
          r = time_stacked(spec, runs, seeds, steps, conv, overlap, dtype)
          r["x_alone"] = r["run_steps_per_s"] / alone["run_steps_per_s"]
          result["stacked"].append(r)
  return result


def format_report(result: dict) -> str:
  lines = [f"{result['config']} on {result['devices']} x {result['device_kind']} ({result['platform']}), "
           f"jax {result['jax']}, {result['seeds']} seed(s)"]
  for dtype, alone in result["alone"].items():
    lines.append(f"alone, {dtype}: {alone['step_ms']:.1f} ms/step, {alone['run_steps_per_s']:.2f} run-steps/s, "
                 f"peak {alone['peak_mb']:.1f} MB")
  lines += ["", "| dtype | conv | overlap | runs | mesh run x data | step (ms) | run-steps/s | x alone | "
            "ms per run-step | MB per run | compile (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["stacked"]:
    lines.append(f"| {r['dtype']} | {r['conv']} | {'on' if r['overlap'] else 'off'} | {r['runs']} | "
                 f"{r['mesh']['run']} x {r['mesh']['data']} | {r['step_ms']:.1f} | {r['run_steps_per_s']:.2f} | "
                 f"{r['x_alone']:.2f} | {r['ms_per_run_step']:.1f} | {r['peak_mb_per_run']:.1f} | "
                 f"{r['compile_s']:.1f} |")
  if result.get("skipped"):
    lines.append(f"not measured (time budget): {len(result['skipped'])} settings")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=config_files.repo_config("digits_lt"), help="config file[:args]")
  parser.add_argument("--runs", default="1,3,9,27", help="comma-separated numbers of stacked runs")
  parser.add_argument("--seeds", type=int, default=1, help="input streams the runs are spread over")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per run count, after warm-up")
  parser.add_argument("--conv", default="auto", help="comma-separated formulations: grouped, per_run, auto")
  parser.add_argument("--overlap", default="auto", help="comma-separated GPU kernel overlap settings: on, off, auto")
  parser.add_argument("--dtype", default="", help="comma-separated model dtypes (default: the config's)")
  parser.add_argument("--out", default="bench_together.json", help="JSON output file")
  args = parser.parse_args(argv)
  counts = [int(r) for r in args.runs.split(",")]
  if any(r < 1 for r in counts) or args.seeds < 1 or any(r < args.seeds for r in counts):
    parser.error(f"--runs={args.runs} and --seeds={args.seeds}: every run count must be >= the seeds (>= 1).")
  convs = tuple(c for c in args.conv.split(",") if c)
  overlaps = tuple(o for o in args.overlap.split(",") if o)
  bad = [c for c in convs if c not in program_lib.CONV_FORMULATIONS] + [
      o for o in overlaps if o not in program_lib.OVERLAP_SETTINGS]
  if bad or not convs or not overlaps:
    parser.error(f"--conv takes {program_lib.CONV_FORMULATIONS}, --overlap {program_lib.OVERLAP_SETTINGS}; got "
                 f"{args.conv!r}, {args.overlap!r}.")
  from semi_jax import startup
  startup.prepare(config_files.load(args.config).cpu_fast_paths)
  result = run(args.config, counts, args.seeds, args.steps, convs, overlaps,
               tuple(d for d in args.dtype.split(",") if d) or (None,))
  print(format_report(result))
  files.write_json_atomic(args.out, result)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
