"""Speed of the pieces of a training run: train step, memory-bank update, eval step, the training loop's host
time, input pipeline.

  python -m semi_jax.tools.bench [--out=bench.json] [--steps=20] [--quick] [--algos=semi,acr,fixmatch]
                                 [--dtype=float32] [--cpu_fast_paths=auto] [--config=PATH] [--bank_calls=200]
                                 [--loop_steps=2000] [--input_seconds=5] [--profile=DIR] [--peak_tflops=T]
                                 [--batch_size=B] [--eval_batch_size=E] [--cost_only]

The default setting is the paper's CIFAR-10-LT step (`configs/cifar10_lt.py`, or `--config`): WRN-28-2, labeled
batch 64, mu=1 (64 labeled + 3 x 64 unlabeled views = 256 images per forward pass), 10 classes, 32x32. `--quick`
shrinks everything (WRN-10-1, 8x8, batch 8) to check that the script runs. The state and batches are synthetic
(random uint8 images, a long-tailed class prior), so no data set is needed. Steps run on a 1-device mesh laid
out as a real run is (state replicated, batch sharded over `data`), compiled as `semi_jax.train` compiles them
(with the CPU fast paths where `--cpu_fast_paths` and the device say so), with the class count of the config's
data set. The loop measurement runs `semi_jax.train`'s own training loop with a trivial model on every device, to
show its host time per step.

Every train step also reports its FLOPs (XLA's cost model) and the device memory of the compiled program
(`memory_analysis`: arguments, i.e. the donated state and the batch, outputs and temporaries). `--batch_size` and
`--eval_batch_size` shrink a configuration to what the machine can run (ResNet-50 at 64x64 on a few CPU cores);
`--cost_only` compiles the configured train steps without running them and reports only FLOPs and memory (the
full-size figures of a step too big for the machine). On CPUs the memory figures come from XLA:CPU's buffer
assignment, an estimate of what a GPU or TPU program needs.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import platform
import re
import statistics
import tempfile
import time
from collections import Counter
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semi_jax import config_files, cpu, datasets, files, memory_bank, sharding, startup, train
from semi_jax import program as program_lib
from semi_jax.cpu import malloc

# (num_classes, bank size K, candidates N, feature dim D, feature dtype) of CIFAR-10, CIFAR-100 (WRN-28-2: D = 128)
# and ImageNet-127 (N = 2 strong views x U), the latter also with ResNet-50's D = 2048 in both bank dtypes.
BANK_SIZES = ((10, 128, 128, 128, "float32"), (100, 128, 512, 128, "float32"), (127, 128, 1024, 128, "float32"),
              (127, 128, 1024, 2048, "float32"), (127, 128, 1024, 2048, "bfloat16"))
QUICK_BANK_SIZES = ((10, 8, 16, 128, "float32"), (20, 8, 32, 64, "bfloat16"))
WARMUP_STEPS = 2
STEP_SEED = 1  # the train step's rng key


def bench_config(algo: str, quick: bool, dtype: str = "float32", cpu_fast_paths: str = "auto",
                 config_path: str | None = None, batch_size: int | None = None, eval_batch_size: int | None = None):
  """The config of `config_path` (default: the CIFAR-10-LT config) for `algo`, or its tiny version with `quick`
  (WRN-10-1, or a ResNet of one bottleneck per stage at base width 4, on 8x8 images); `batch_size` and
  `eval_batch_size` replace the config's."""
  spec = config_path or config_files.repo_config("cifar10_lt")
  config = config_files.load(f"{spec}{',' if ':' in spec else ':'}algo={algo}")
  config.model.dtype = dtype
  config.cpu_fast_paths = cpu_fast_paths
  if quick:
    config.data.image_size = 8
    config.model.depth, config.model.width = 10, 1
    config.model.blocks, config.model.base_width = (1, 1, 1, 1), 4
    config.train.batch_size = 8
    config.train.eval_batch_size = 32
    config.bank.size = 8
  config.train.batch_size = batch_size or config.train.batch_size
  config.train.eval_batch_size = eval_batch_size or config.train.eval_batch_size
  return config


def median_ms(seconds: list[float]) -> float:
  return 1000.0 * statistics.median(seconds)


def compiled_flops(lowered, compiled=None) -> float | None:
  """FLOPs of one call according to XLA's cost model of the program as written, else of `compiled` (None where
  the backend gives neither). The lowered program first: XLA:CPU hands convolutions to oneDNN as custom calls,
  which its cost model of the compiled program does not count. jax 0.11's GPU backend gave no analysis of the
  lowered program."""
  for analysed in (lowered, compiled):
    cost = None if analysed is None else analysed.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    if cost and cost.get("flops"):
      return float(cost["flops"])
  return None


def compiled_memory(compiled) -> dict:
  """Device memory of a compiled program in MB (None where the backend reports none): arguments (the donated state
  and the batch), outputs, the part of the outputs aliased to arguments, temporaries, and their sum less the
  aliases, the program's peak."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  mb = lambda n: n / 2 ** 20
  out = {"argument_mb": mb(stats.argument_size_in_bytes), "output_mb": mb(stats.output_size_in_bytes),
         "alias_mb": mb(stats.alias_size_in_bytes), "temp_mb": mb(stats.temp_size_in_bytes)}
  out["peak_mb"] = out["argument_mb"] + out["output_mb"] - out["alias_mb"] + out["temp_mb"]
  return out


def long_tail_prior(num_classes: int, imbalance: float = 100.0) -> np.ndarray:
  """Exponentially long-tailed class frequencies (head / tail = imbalance), summing to 1."""
  counts = imbalance ** (-np.arange(num_classes) / max(num_classes - 1, 1))
  return (counts / counts.sum()).astype(np.float32)


def build_program(config, mesh, num_classes: int = 10, model=None) -> program_lib.Program:
  """`program_lib.build_program` with a synthetic long-tailed class prior and normalisation."""
  return program_lib.build_program(config, mesh, num_classes=num_classes, class_prior=long_tail_prior(num_classes),
                             mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32), model=model)


def synthetic_batch(rng: np.random.Generator, config, num_classes: int, process_count: int = 1,
                    views_on_device: bool = False) -> dict:
  """One process's train batch of random images and labels, as `Trainer.train_batches` yields it (the layout of
  random images needs no packing); with `views_on_device`, the source batch (b + u images and their positions)
  of a step that makes the views itself."""
  t, s = config.train, config.data.image_size
  b, u = t.batch_size // process_count, t.batch_size * t.mu // process_count
  label = lambda n: rng.integers(0, num_classes, (n,), dtype=np.int32)
  labels = {"y": label(b), "u_label": label(u), "u_index": np.arange(u, dtype=np.int32)}
  if views_on_device:
    return {"images": rng.integers(0, 256, (b + u, s, s, 3), dtype=np.uint8),
            "positions": np.arange(b + u, dtype=np.int32), **labels}
  return {"images": rng.integers(0, 256, (b + 3 * u, s, s, 3), dtype=np.uint8), **labels}


def profile_step(run_step, trace_dir: str, top: int = 12) -> dict:
  """Runs `run_step()` once under the JAX profiler and sums the traced XLA op time by op kind.

  XLA names its ops `<kind>.<n>` (e.g. `wrapped_reduce-window.85`, `custom-call.78.clone__onednn$convolution`);
  the numbers (and `.clone`) are dropped and the time of each kind summed over every thread that ran XLA work.
  On CPU, Eigen convolutions hand their work to a thread pool whose time is not attributed to the op, so it
  shows up as the gap between the step's wall time times the threads and the attributed total.
  """
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    run_step()
    wall_ms = 1000.0 * (time.perf_counter() - start)
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise FileNotFoundError(f"the profiler wrote no .xplane.pb trace under {trace_dir}.")
  by_kind = Counter()
  for plane in jax.profiler.ProfileData.from_file(files[-1]).planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if not event.name.startswith("ThunkExecutor"):
          by_kind[re.sub(r"\.(?:\d+|clone)(?=[._]|$)", "", event.name)] += event.duration_ns / 1e6
  return {"trace_dir": trace_dir, "step_wall_ms": wall_ms, "attributed_ms": sum(by_kind.values()),
          "top_op_kinds_ms": dict(by_kind.most_common(top))}


@dataclasses.dataclass
class CompiledStep:
  """A compiled train step as the training loop runs it (`program.Program.train_step`), with its inputs."""
  compiled: Any
  lowered: Any
  compile_s: float
  state: Any
  carry: Any
  batches: list
  rng: Any
  views_on_device: bool = False  # the step makes the views from source batches (data.augment_on)

  def run(self, batch_index: int = 0):
    """One step on batch `batch_index` (state and carry are donated and replaced); returns when it is done."""
    self.state, self.carry = self.compiled(self.state, self.carry, self.batches[batch_index % len(self.batches)],
                                           self.rng)
    jax.block_until_ready((self.state, self.carry))

  def loss(self) -> float:
    """The mean loss of the steps run so far."""
    return float(jax.device_get(self.carry["metrics"]).compute()["loss"])


def compiled_train_step(config, num_classes: int = 10, mesh=None) -> CompiledStep:
  """The train step of `config` as `semi_jax.train` compiles it (state and carry donated), with its initial state
  and two batches. The state's step counter is past the warm-up epochs, so that every SeMi term is live (their
  cost is paid either way: the warm-up switches are selects, not branches)."""
  mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
  program = build_program(config, mesh, num_classes)
  state = program.init_state(jax.random.key(0))
  past_warmup = config.train.steps_per_epoch * (config.ssl.est_epoch + 1)
  state = state.replace(step=jax.device_put(jnp.asarray(past_warmup, jnp.int32), sharding.replicated(mesh)))
  rng = np.random.default_rng(0)
  batches = [sharding.to_global(synthetic_batch(rng, config, num_classes, views_on_device=program.views_on_device),
                                mesh) for _ in range(2)]
  carry = program.init_carry()
  step_rng = jax.random.key(STEP_SEED)
  start = time.perf_counter()
  lowered = program.train_step.lower(state, carry, batches[0], step_rng)
  compiled = lowered.compile()
  return CompiledStep(compiled, lowered, time.perf_counter() - start, state, carry, batches, step_rng,
                      program.views_on_device)


def time_train_step(config, steps: int, num_classes: int = 10, mesh=None, profile_dir: str | None = None) -> dict:
  """Compile time and per-step times of the jitted, state-donating train step (after the warm-up); with
  `profile_dir`, one more step is traced there and summarised (see `profile_step`)."""
  step = compiled_train_step(config, num_classes, mesh)
  times, cpu_times = [], []
  for i in range(WARMUP_STEPS + steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    step.run(i)
    if i >= WARMUP_STEPS:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  profile = profile_step(step.run, profile_dir) if profile_dir else None
  loss = step.loss()
  if not np.isfinite(loss):
    raise FloatingPointError(f"train step of algo={config.ssl.algo} gave a non-finite loss {loss}.")
  t = config.train
  images = t.batch_size * (1 + 3 * t.mu)
  ms = median_ms(times)
  flops = compiled_flops(step.lowered, step.compiled)
  return {"algo": config.ssl.algo, "views_on_device": step.views_on_device, "compile_s": step.compile_s,
          "median_ms": ms, "min_ms": 1000.0 * min(times),
          "cpu_ms": median_ms(cpu_times), "images_per_step": images, "images_per_s": images / (ms / 1000.0),
          "steps": len(times),
          "gflop_per_step": None if flops is None else flops / 1e9,
          "gflop_per_s": None if flops is None else flops / 1e9 / (ms / 1000.0), "profile": profile,
          "memory": compiled_memory(step.compiled)}


def train_step_cost(config, num_classes: int = 10) -> dict:
  """FLOPs and device memory of the compiled train step of `config`, without running it."""
  step = compiled_train_step(config, num_classes)
  flops = compiled_flops(step.lowered, step.compiled)
  t = config.train
  return {"algo": config.ssl.algo, "compile_s": step.compile_s, "images_per_step": t.batch_size * (1 + 3 * t.mu),
          "gflop_per_step": None if flops is None else flops / 1e9, "memory": compiled_memory(step.compiled)}


def _random_candidates(rng: np.random.Generator, n: int, num_classes: int, dim: int) -> tuple:
  feats = rng.standard_normal((n, dim)).astype(np.float32)
  conf = rng.uniform(0.9, 1.0, n).astype(np.float32)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return feats, conf, labels, np.ones(n, bool)


def time_bank_update(num_classes: int, size: int, candidates: int, dim: int, dtype: str, calls: int) -> dict:
  """Median time of one jitted push + decay (and of push alone) on a full bank of `dtype` features.

  The bank is donated and each call's result feeds the next, as in the train step (whose state is donated),
  so that XLA can write the entering features in place.
  """
  rng = np.random.default_rng(0)
  push = jax.jit(memory_bank.push, donate_argnums=0)
  update = jax.jit(lambda bank, *c: memory_bank.decay(memory_bank.push(bank, *c), 0.99), donate_argnums=0)
  bank = memory_bank.init_bank(num_classes, size, dim, jnp.dtype(dtype))
  for _ in range(max(1, -(-2 * num_classes * size // candidates))):  # fill (about 2 K per class offered)
    bank = push(bank, *_random_candidates(rng, candidates, num_classes, dim))
  offers = [jax.device_put(_random_candidates(rng, candidates, num_classes, dim)) for _ in range(4)]
  result = {"classes": num_classes, "size": size, "candidates": candidates, "dim": dim, "dtype": dtype,
            "calls": calls, "bank_mb": sum(a.nbytes for a in jax.tree.leaves(bank)) / 2 ** 20}
  for name, fn in (("push_ms", push), ("push_decay_ms", update)):
    bank = jax.block_until_ready(fn(bank, *offers[0]))
    times, cpu_times = [], []
    for i in range(calls):
      start, cpu_start = time.perf_counter(), time.process_time()
      bank = jax.block_until_ready(fn(bank, *offers[i % len(offers)]))
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
    result[name] = median_ms(times)
    result[name.replace("_ms", "_cpu_ms")] = median_ms(cpu_times)
  return result


def time_eval_step(config, calls: int, num_classes: int = 10) -> dict:
  """Median time of the jitted eval step on one batch of train.eval_batch_size images."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  program = build_program(config, mesh, num_classes)
  state = program.init_state(jax.random.key(0))
  n, s = config.train.eval_batch_size, config.data.image_size
  rng = np.random.default_rng(0)
  batch = sharding.to_global({"image": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
                              "label": rng.integers(0, num_classes, n, dtype=np.int32),
                              "mask": np.ones(n, bool)}, mesh)
  start = time.perf_counter()
  compiled = program.eval_step.lower(state.ema_params, state.batch_stats, batch).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(state.ema_params, state.batch_stats, batch))
  times, cpu_times = [], []
  for _ in range(calls):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(state.ema_params, state.batch_stats, batch))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  ms = median_ms(times)
  return {"batch": n, "compile_s": compile_s, "median_ms": ms, "min_ms": 1000.0 * min(times),
          "cpu_ms": median_ms(cpu_times), "images_per_s": n / (ms / 1000.0)}


class TrivialModel(nn.Module):
  """A model with the interface of WideResNet and almost no compute: pooled pixels, one BatchNorm, two heads."""
  num_classes: int
  feature_dim: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = nn.Dense(self.feature_dim)(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
    features = nn.BatchNorm(use_running_average=not train)(features)
    return nn.Dense(self.num_classes, name="fc")(features), nn.Dense(self.num_classes, name="fc1")(features), features


def time_training_loop(steps: int, warmup: int = 200) -> dict:
  """Host cost of `semi_jax.train`'s training loop: `Trainer.run` with a trivial model, on every device.

  The model and the test config's tiny SeMi objective leave almost nothing to compute, so the loop's own work
  (the step dispatch, the batch transfer, hooks, metric logging every 100 steps) sets the pace. Batches are
  synthetic and prepared beforehand (the tf.data pipeline is measured separately). Timed from step `warmup` to
  the end; also the CPU time of the loop's thread per step, and the compiled step alone, called synchronously.
  """
  config = config_files.load(config_files.repo_config("test"))
  total = warmup + steps
  config.train.total_steps = total
  config.train.steps_per_epoch = 100
  config.train.log_every_steps = 100
  config.train.eval_every_steps = config.train.checkpoint_every_steps = total
  config.ssl.est_epoch = 0
  with tempfile.TemporaryDirectory() as workdir:
    model = TrivialModel(num_classes=datasets.num_classes(config.data.name))
    trainer = train.Trainer(config, workdir, model=model)
    rng = np.random.default_rng(0)
    pool = [synthetic_batch(rng, config, trainer.num_classes, jax.process_count(),
                            views_on_device=trainer.program.views_on_device) for _ in range(4)]
    marks = {}

    def batches():
      # Pulled by the loop `data.prefetch` steps ahead of the step it feeds: a constant offset.
      for i in range(total + config.data.prefetch):
        if i in (warmup, total):
          marks[i] = (time.perf_counter(), time.thread_time())
        yield [pool[i % len(pool)]]  # one input stream

    trainer.run(batches=batches())
    wall, thread = (b - a for a, b in zip(marks[warmup], marks[total]))
    step_alone = []
    state, carry = trainer.state, trainer.program.init_carry()
    batch = sharding.to_global(pool[0], trainer.mesh)
    for _ in range(warmup):
      start = time.perf_counter()
      state, carry = trainer.program.train_step(state, carry, batch, trainer.step_rng)
      jax.block_until_ready((state, carry))
      step_alone.append(time.perf_counter() - start)
  return {"steps": steps, "devices": trainer.mesh.devices.size, "ms_per_step": 1000.0 * wall / steps,
          "steps_per_s": steps / wall, "loop_thread_cpu_ms_per_step": 1000.0 * thread / steps,
          "synchronous_step_ms": median_ms(step_alone)}


def time_input_pipeline(size: int, batch: int, seconds: float) -> dict:
  """Source images/s of the unlabeled stream (weak + 2 strong views) and the labeled stream (weak view)."""
  from semi_jax.tools import bench_augment  # imports TensorFlow: only when measured
  threads = os.cpu_count() or 1
  result = {"threads": threads, "size": size, "batch": batch}
  for views, key in (("weak", "weak"), ("weak+2strong", "weak_2strong")):
    rate = bench_augment.measure(views, threads, seconds=seconds, size=size, batch=batch)
    # measure gives images per wall-clock second, or (per wall-clock second, per CPU-second).
    wall, cpu = rate if isinstance(rate, tuple) else (rate, None)
    result[f"{key}_images_per_s"] = wall
    result[f"{key}_images_per_cpu_s"] = cpu
  return result


def environment(config=None) -> dict:
  """Versions, devices and settings of this process; with `config`, the CPU fast paths and compiler options
  its programs get on one device."""
  devices = jax.devices()
  env = {"jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
         "backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
         "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "host_malloc": malloc.status}
  if config is not None:
    fast, options = program_lib.cpu_fast_paths(config, sharding.make_mesh(devices=devices[:1]))
    env.update(cpu_fast_paths=fast, compiler_options=options)
  return env


def _jaxlib_version() -> str:
  import jaxlib
  return jaxlib.__version__


def run(steps: int = 20, quick: bool = False, algos=("semi", "acr", "fixmatch"), dtype: str = "float32",
        bank_calls: int = 200, input_seconds: float = 5.0, profile_dir: str | None = None,
        peak_tflops: float | None = None, cpu_fast_paths: str = "auto", config_path: str | None = None,
        loop_steps: int = 2000, batch_size: int | None = None, eval_batch_size: int | None = None,
        cost_only: bool = False) -> dict:
  """Runs every measurement and returns them as one JSON-serialisable dict.

  With `peak_tflops` (the device's peak for the dtype in use, e.g. the tensor-core peak for bfloat16), every
  train step also gets `fraction_of_peak`: its GFLOP/s (from XLA's FLOP count of the program) over that peak.
  With `cost_only`, only the train steps are compiled, not run, and only their FLOPs and memory reported.
  """
  if peak_tflops is not None and not peak_tflops > 0:
    raise ValueError(f"peak_tflops must be > 0 (the device's peak TFLOP/s for {dtype}), got {peak_tflops}.")
  if steps < 1:
    raise ValueError(f"steps must be >= 1 (timed train steps after {WARMUP_STEPS} warm-up steps), got {steps}.")
  if bank_calls < 1:
    raise ValueError(f"bank_calls must be >= 1, got {bank_calls}.")
  if not algos:
    raise ValueError("algos is empty; name at least one of semi, acr, fixmatch, fixmatch_la.")
  if loop_steps < 0:
    raise ValueError(f"loop_steps must be >= 0 (0 skips the loop measurement), got {loop_steps}.")
  config_of = lambda algo: bench_config(algo, quick, dtype, cpu_fast_paths, config_path, batch_size, eval_batch_size)
  config = config_of(algos[0])
  num_classes = datasets.num_classes(config.data.name)
  result = {"environment": environment(config), "quick": quick, "dtype": dtype, "peak_tflops": peak_tflops,
            "model": describe_model(config, num_classes)}
  if cost_only:
    result["train_step_cost"] = {algo: train_step_cost(config_of(algo), num_classes) for algo in algos}
    return result
  result["train_step"] = {}
  if loop_steps:  # first: after the big steps, a heap grown by them makes the loop's small allocations slower
    result["training_loop"] = time_training_loop(loop_steps, warmup=min(200, loop_steps))
  for i, algo in enumerate(algos):  # only the first algorithm's step is profiled
    r = time_train_step(config_of(algo), steps, num_classes, profile_dir=profile_dir if i == 0 else None)
    if peak_tflops is not None and r["gflop_per_s"] is not None:
      r["fraction_of_peak"] = r["gflop_per_s"] / (1000.0 * peak_tflops)
    result["train_step"][algo] = r
  ts = result["train_step"]
  if "semi" in ts:
    result["semi_extra_pct_of_step"] = {
        base: 100.0 * (ts["semi"]["median_ms"] - ts[base]["median_ms"]) / ts["semi"]["median_ms"]
        for base in ts if base != "semi"}
  result["bank_update"] = [time_bank_update(c, k, n, d, dt, bank_calls)
                           for c, k, n, d, dt in (QUICK_BANK_SIZES if quick else BANK_SIZES)]
  result["eval_step"] = time_eval_step(config, calls=max(3, steps // 2), num_classes=num_classes)
  if input_seconds > 0:
    result["input_pipeline"] = time_input_pipeline(config.data.image_size, config.train.batch_size,
                                                   input_seconds)
  return result


def describe_model(config, num_classes: int) -> str:
  """The timed model in words, e.g. 'resnet (3, 4, 6, 3) bottleneck, base width 64: 24.0 M parameters, D = 2048'."""
  from semi_jax.models import create_model  # pylint: disable=import-outside-toplevel
  model = create_model(config.model, num_classes)
  size = config.data.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  count = sum(a.size for a in jax.tree.leaves(shapes["params"]))
  m = config.model
  name = (f"resnet {tuple(m.blocks)} {m.block}, base width {m.base_width}" if m.name == "resnet"
          else f"wide_resnet-{m.depth}-{m.width}")
  return (f"{name}: {count / 1e6:.2f} M parameters, D = {model.feature_dim}, {num_classes} classes, "
          f"{size}x{size} images, labeled batch {config.train.batch_size}, mu {config.train.mu}")


def _format_memory(memory: dict) -> str:
  if not memory:
    return "memory: not reported by this backend"
  return (f"memory: {memory['peak_mb']:.0f} MB peak = arguments {memory['argument_mb']:.0f} + outputs "
          f"{memory['output_mb']:.0f} - donated {memory['alias_mb']:.0f} + temporaries {memory['temp_mb']:.0f}")


def format_report(result: dict) -> str:
  env = result["environment"]
  lines = [f"jax {env['jax']} (jaxlib {env['jaxlib']}), {env['device_count']} x {env['device_kind']} "
           f"({env['backend']}), {env['cpu_count']} CPUs, dtype {result['dtype']}, "
           f"XLA_FLAGS={env['xla_flags'] or '(none)'}, CPU fast paths: {env['cpu_fast_paths']} (compiler "
           f"options {env['compiler_options'] or 'none'}), malloc: {env['host_malloc']}",
           f"model: {result['model']}", ""]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  if "train_step_cost" in result:
    for algo, r in result["train_step_cost"].items():
      lines.append(f"{algo} train step ({r['images_per_step']} images), compiled in {r['compile_s']:.1f} s, not run: "
                   f"{fmt(r['gflop_per_step'], '.1f')} GFLOP; {_format_memory(r['memory'])}")
    return "\n".join(lines)
  lines += ["Wall-clock times; 'CPU ms' is the process's CPU time per call (all threads), which other load on the "
           "machine inflates much less.", "",
           f"{'train step':<12}{'compile s':>10}{'median ms':>11}{'min ms':>9}{'CPU ms':>9}{'images/s':>10}"
           f"{'GFLOP':>8}{'GFLOP/s':>9}"]
  for algo, r in result["train_step"].items():
    lines.append(f"{algo:<12}{r['compile_s']:>10.1f}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}"
                 f"{r['cpu_ms']:>9.1f}{r['images_per_s']:>10.1f}{fmt(r['gflop_per_step'], '8.1f')}"
                 f"{fmt(r['gflop_per_s'], '9.1f')}")
  for algo, r in result["train_step"].items():
    lines.append(f"{algo} step {_format_memory(r['memory'])}")
  for algo, r in result["train_step"].items():
    if "fraction_of_peak" in r:
      lines.append(f"{algo}: {100.0 * r['fraction_of_peak']:.1f}% of the given peak of {result['peak_tflops']:g} "
                   f"TFLOP/s")
  for base, pct in result.get("semi_extra_pct_of_step", {}).items():
    lines.append(f"SeMi extra cost over {base}: {pct:.1f}% of the SeMi step")
  for algo, r in result["train_step"].items():
    if r.get("profile"):
      p = r["profile"]
      lines += ["", f"profile of one {algo} step (trace in {p['trace_dir']}): {p['step_wall_ms']:.0f} ms wall, "
                f"{p['attributed_ms']:.0f} ms of XLA op time attributed over all threads (on CPU the Eigen "
                "convolutions' work is not)"]
      lines += [f"  {ms:9.1f} ms  {kind}" for kind, ms in p["top_op_kinds_ms"].items()]
  lines += ["", f"{'bank update (C, K, N, D, dtype)':<40}{'MB':>7}{'push ms':>10}{'CPU ms':>9}"
            f"{'push+decay ms':>15}{'CPU ms':>9}"]
  for r in result["bank_update"]:
    sizes = (r["classes"], r["size"], r["candidates"], r["dim"], r["dtype"])
    lines.append(f"{str(sizes):<40}{r['bank_mb']:>7.1f}{r['push_ms']:>10.3f}"
                 f"{r['push_cpu_ms']:>9.3f}{r['push_decay_ms']:>15.3f}{r['push_decay_cpu_ms']:>9.3f}")
  e = result["eval_step"]
  lines += ["", f"eval step, batch {e['batch']}: compile {e['compile_s']:.1f} s, median {e['median_ms']:.1f} ms "
            f"(min {e['min_ms']:.1f}, CPU {e['cpu_ms']:.1f}), {e['images_per_s']:.0f} images/s"]
  if "training_loop" in result:
    r = result["training_loop"]
    lines.append(f"training loop (semi_jax.train, trivial model, {r['devices']} device(s)): {r['steps_per_s']:.0f} "
                 f"steps/s, {r['ms_per_step']:.3f} ms per step ({r['loop_thread_cpu_ms_per_step']:.3f} ms CPU time "
                 f"of the loop's thread); the step alone, called synchronously: {r['synchronous_step_ms']:.3f} ms")
  if "input_pipeline" in result:
    p = result["input_pipeline"]
    per_cpu = lambda key: ("" if p[f"{key}_images_per_cpu_s"] is None
                           else f" ({p[f'{key}_images_per_cpu_s']:.0f} per CPU-second)")
    lines.append(f"input pipeline, {p['size']}x{p['size']}, {p['threads']} threads: weak "
                 f"{p['weak_images_per_s']:.0f} images/s{per_cpu('weak')}, weak + 2 strong "
                 f"{p['weak_2strong_images_per_s']:.0f} source images/s{per_cpu('weak_2strong')}")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench.json", help="JSON output file")
  parser.add_argument("--steps", type=int, default=20, help="timed train steps per algorithm, after warm-up")
  parser.add_argument("--quick", action="store_true", help="tiny model and images: checks that it runs")
  parser.add_argument("--algos", default="semi,acr,fixmatch", help="comma-separated algorithm presets")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model compute dtype")
  parser.add_argument("--cpu_fast_paths", default="auto", choices=cpu.SETTINGS,
                      help="semi_jax.cpu's speed-ups: auto = on exactly when the devices are CPUs")
  parser.add_argument("--config", default=None, metavar="PATH",
                      help="config file of the timed steps (default: configs/cifar10_lt.py of this checkout)")
  parser.add_argument("--loop_steps", type=int, default=2000,
                      help="steps of the training-loop measurement with a trivial model (0 skips it)")
  parser.add_argument("--bank_calls", type=int, default=200, help="timed calls per memory-bank size")
  parser.add_argument("--input_seconds", type=float, default=5.0,
                      help="seconds per input-pipeline measurement (0 skips it)")
  parser.add_argument("--profile", default="", metavar="DIR",
                      help="trace one step of the first algorithm with the JAX profiler into DIR (TensorBoard "
                           "format) and print the op kinds that took the most time")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's peak TFLOP/s for --dtype (e.g. 989 for an H100 SXM's dense bfloat16 "
                           "tensor cores): adds each train step's fraction of it")
  parser.add_argument("--batch_size", type=int, default=None, help="labeled batch of the timed steps (default: "
                      "the config's; the unlabeled batch is mu times it)")
  parser.add_argument("--eval_batch_size", type=int, default=None, help="batch of the timed eval step (default: "
                      "the config's)")
  parser.add_argument("--cost_only", action="store_true",
                      help="compile the train steps without running them: FLOPs and device memory only")
  args = parser.parse_args(argv)
  startup.prepare(args.cpu_fast_paths)  # as semi_jax.main does, before JAX starts its threads
  try:
    result = run(steps=args.steps, quick=args.quick, algos=tuple(a for a in args.algos.split(",") if a),
                 dtype=args.dtype, bank_calls=args.bank_calls, input_seconds=args.input_seconds,
                 profile_dir=args.profile or None, peak_tflops=args.peak_tflops, cpu_fast_paths=args.cpu_fast_paths,
                 config_path=args.config, loop_steps=args.loop_steps, batch_size=args.batch_size,
                 eval_batch_size=args.eval_batch_size, cost_only=args.cost_only)
  except ValueError as e:
    raise SystemExit(f"semi_jax.tools.bench: {e}") from None
  print(format_report(result))
  files.write_json_atomic(args.out, result)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
