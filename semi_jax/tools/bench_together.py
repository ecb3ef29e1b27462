"""Speed of runs trained together (semi_jax.together): run-steps per second against the number of stacked runs.

  python -m semi_jax.tools.bench_together [--config=configs/digits_lt.py] [--runs=1,3,9,27] [--steps=10]
                                          [--seeds=1] [--out=bench_together.json]

For every run count R, R runs of the config that differ in a traced hyper-parameter (the bank's confidence decay
bank.beta, as the decay sweep does; with --seeds=S they are spread over S seeds, so S input streams) are stacked
into one program on all devices (`together.choose_axes`), and its train step is timed on synthetic batches
(random uint8 images; the step's cost does not depend on them). Reported per R: the step time, run-steps per
second (R / step time), the time per run-step, and the device memory of the compiled step per run (XLA's
`memory_analysis`: the donated state, the batches, outputs and temporaries). The baseline is the same config
trained alone (`semi_jax.train`'s own program, R = 1 without a run axis), measured in the same process.
Default setting: configs/digits_lt.py (WRN-10-2, 16x16, batch 32 + 3 x 64 views); --config=configs/cifar10_lt.py
for WRN-28-2 at 32x32.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from semi_jax import config_files, files, hyperparams, sharding, together
from semi_jax.tools import bench

WARMUP_STEPS = 2


def _configs(spec: str, runs: int, seeds: int):
  """`runs` configs of `spec` whose bank.beta differs (0.95 .. 0.999), over `seeds` seeds."""
  configs = []
  for r in range(runs):
    config = config_files.load(spec)
    config.bank.beta.value = float(0.95 + 0.049 * r / max(runs - 1, 1))
    config.seed = r % seeds
    configs.append(config)
  return configs


def time_stacked(spec: str, runs: int, seeds: int, steps: int, num_classes: int = 10) -> dict:
  """Step time, throughput and memory of `runs` stacked runs on all devices."""
  configs = _configs(spec, runs, seeds)
  config = configs[0]
  r_axis, d_axis = together.choose_axes(jax.device_count(), runs, config.train.batch_size)
  mesh = together.make_mesh(r_axis, d_axis)
  padded = -(-runs // r_axis) * r_axis
  configs += [configs[-1]] * (padded - runs)
  program = together.build_stacked_program(config, mesh, padded, num_classes=num_classes,
                                           class_prior=bench._class_prior(num_classes),
                                           mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32))
  by_run = NamedSharding(mesh, P(together.RUN_AXIS))
  varying = hyperparams.varying(configs)
  hp = together._global(jax.tree.map(lambda *xs: np.stack(xs), *[hyperparams.values(c, varying) for c in configs])
                        if varying else {}, by_run)
  seed_index = together._global(np.asarray([c.seed for c in configs], np.int32), by_run)
  keys = jax.jit(lambda: jax.vmap(jax.random.key)(np.arange(padded, dtype=np.int32)), out_shardings=by_run)()
  state = program.init_state(keys)
  past_warmup = config.train.steps_per_epoch * (config.ssl.est_epoch + 1)  # every SeMi term live
  state = state.replace(step=together._global(np.full((padded,), past_warmup, np.int32), by_run))
  carry = program.init_carry()
  rng = np.random.default_rng(0)
  views = program.ctx.augment is not None
  spec_batch = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
  batches = []
  for _ in range(2):
    local = [bench.synthetic_batch(rng, config, num_classes, views_on_device=views) for _ in range(seeds)]
    batches.append({k: jax.device_put(np.stack([b[k] for b in local]), spec_batch) for k in local[0]})
  start = time.perf_counter()
  lowered = program.train_step.lower(state, carry, batches[0], keys, hp, seed_index)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(WARMUP_STEPS + steps):
    t0 = time.perf_counter()
    state, carry = compiled(state, carry, batches[i % 2], keys, hp, seed_index)
    jax.block_until_ready(state)
    if i >= WARMUP_STEPS:
      times.append(time.perf_counter() - t0)
  ms = 1000.0 * float(np.median(times))
  memory = bench._memory(compiled)
  return {"runs": runs, "padded_runs": padded, "seeds": seeds, "mesh": {"run": r_axis, "data": d_axis},
          "traced": list(varying), "compile_s": compile_s, "step_ms": ms, "run_steps_per_s": runs / (ms / 1000.0),
          "ms_per_run_step": ms / runs, "peak_mb_per_run": memory.get("peak_mb", float("nan")) / runs,
          "memory": memory}


def time_alone(spec: str, steps: int, num_classes: int = 10) -> dict:
  """The same config trained alone (semi_jax.train's program on one device), as the baseline."""
  config = config_files.load(spec)
  result = bench.time_train_step(config, steps, num_classes)
  return {"step_ms": result["median_ms"], "run_steps_per_s": 1000.0 / result["median_ms"],
          "compile_s": result["compile_s"], "peak_mb": result["memory"].get("peak_mb", float("nan"))}


def format_report(result: dict) -> str:
  alone = result["alone"]
  lines = [f"{result['config']} on {result['devices']} x {result['platform']} device(s), {result['seeds']} seed(s)",
           f"alone: {alone['step_ms']:.1f} ms/step, {alone['run_steps_per_s']:.2f} run-steps/s, "
           f"peak {alone['peak_mb']:.1f} MB", "",
           "| runs | mesh run x data | step (ms) | run-steps/s | x alone | ms per run-step | MB per run "
           "| compile (s) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in result["stacked"]:
    lines.append(f"| {r['runs']} | {r['mesh']['run']} x {r['mesh']['data']} | {r['step_ms']:.1f} | "
                 f"{r['run_steps_per_s']:.2f} | {r['run_steps_per_s'] / alone['run_steps_per_s']:.2f} | "
                 f"{r['ms_per_run_step']:.1f} | {r['peak_mb_per_run']:.1f} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=config_files.repo_config("digits_lt"), help="config file[:args]")
  parser.add_argument("--runs", default="1,3,9,27", help="comma-separated numbers of stacked runs")
  parser.add_argument("--seeds", type=int, default=1, help="input streams the runs are spread over")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per run count, after warm-up")
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--out", default="bench_together.json", help="JSON output file")
  args = parser.parse_args(argv)
  counts = [int(r) for r in args.runs.split(",")]
  if any(r < 1 for r in counts) or args.seeds < 1 or any(r < args.seeds for r in counts):
    parser.error(f"--runs={args.runs} and --seeds={args.seeds}: every run count must be >= the seeds (>= 1).")
  from semi_jax import startup
  startup.prepare(config_files.load(args.config).cpu_fast_paths)
  result = {"config": args.config, "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "seeds": args.seeds,
            "alone": time_alone(args.config, args.steps, args.num_classes),
            "stacked": [time_stacked(args.config, r, args.seeds, args.steps, args.num_classes) for r in counts]}
  print(format_report(result))
  files.write_json_atomic(args.out, result)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
