"""Throughput of the augmentation, on the host (tf.data) and on the device (`device_augment`), and its share of
the SeMi train step.

  python -m semi_jax.tools.bench_augment [--threads 1,2] [--seconds 5] [--size 32] [--batch 64]
                                         [--where host,device] [--steps 10] [--quick] [--cpu_fast_paths auto]

Host: images/s through tf.data on a given number of host threads, for the weak view alone (labeled stream) and
one weak + two strong views (unlabeled stream, counted per source image), over random uint8 images, after a
warm-up that also pays the one-off graph tracing. Device: the same views made by one jitted call per batch on
the default JAX device, per source image. Besides wall-clock images/s both print images per CPU-second of this
process, which stays meaningful on a machine shared with other jobs.

With --steps > 0 it also times the SeMi train step of the CIFAR-10-LT config (WRN-28-2, 64 labeled + 64
unlabeled source images; --quick: the tiny one) on one device, once reading views made by tf.data
(data.augment_on=host) and once making them itself (device), and the step's augmentation alone: its share of
the device step is what the views cost the accelerator.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

_WARMUP_BATCHES = 20
VIEWS = ("weak", "weak+2strong")


def _check(views: str, threads: int | None = None) -> None:
  if views not in VIEWS:
    raise ValueError(f"views must be 'weak' or 'weak+2strong', got {views!r}.")
  if threads is not None and threads < 1:
    raise ValueError(f"threads must be >= 1, got {threads}.")


def _dataset(images: np.ndarray, views: str, threads: int, batch: int, seed: int):
  import tensorflow as tf
  from semi_jax import augment

  def weak(index, image):
    return augment.labeled_view(image, tf.stack([tf.constant(seed, tf.int64), index]))

  def all_views(index, image):
    return augment.unlabeled_views(image, tf.stack([tf.constant(seed, tf.int64), index]))

  ds = tf.data.Dataset.from_tensor_slices(images).repeat().enumerate()
  ds = ds.map(weak if views == "weak" else all_views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def _timed(run_batch, seconds: float) -> tuple[int, float, float]:
  """(batches, wall seconds, CPU seconds of this process) of calling `run_batch(i)` for `seconds`."""
  batches = 0
  start, cpu_start = time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    run_batch(batches)
    batches += 1
  return batches, time.perf_counter() - start, time.process_time() - cpu_start


def measure(views: str, threads: int, *, seconds: float = 5.0, size: int = 32, batch: int = 64,
            num_images: int = 4096, seed: int = 0) -> tuple[float, float]:
  """(images per wall-clock second, images per CPU-second) of tf.data for `views` in VIEWS on `threads`
  tf.data threads."""
  _check(views, threads)
  images = np.random.default_rng(seed).integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
  iterator = iter(_dataset(images, views, threads, batch, seed))
  for _ in range(_WARMUP_BATCHES):
    next(iterator)
  batches, wall, cpu = _timed(lambda i: next(iterator), seconds)
  return batches * batch / wall, batches * batch / cpu


def measure_device(views: str, *, seconds: float = 5.0, size: int = 32, batch: int = 64,
                   seed: int = 0) -> tuple[float, float]:
  """(source images per wall-clock second, per CPU-second) of `device_augment` making `views` for batches of
  `batch` images already on the default device, one jitted call per batch, each waited for."""
  _check(views)
  import jax
  from semi_jax import device_augment
  settings = device_augment.Settings()
  make = device_augment.labeled_batch if views == "weak" else device_augment.unlabeled_batch
  run = jax.jit(lambda images, positions, root: make(images, positions, root, settings))
  images = jax.device_put(np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
  positions = [jax.device_put(np.arange(batch, dtype=np.int32) + i * batch) for i in range(4)]
  root = device_augment.root_key(jax.random.key(seed))
  for i in range(_WARMUP_BATCHES // 4):  # the first call compiles
    jax.block_until_ready(run(images, positions[i % 4], root))
  batches, wall, cpu = _timed(lambda i: jax.block_until_ready(run(images, positions[i % 4], root)), seconds)
  return batches * batch / wall, batches * batch / cpu


def time_step_augmentation(config, steps: int) -> dict:
  """The train step of `config` on one device with the views made by tf.data (host) and in the step (device),
  and the step's augmentation alone (`device_augment.train_images` of its source batch): medians in ms."""
  import jax
  from semi_jax.tools import bench
  t = config.train
  result = {"labeled": t.batch_size, "unlabeled": t.batch_size * t.mu, "size": config.data.image_size,
            "device": str(jax.devices()[0].device_kind)}
  for place in ("host", "device"):
    placed = config.copy_and_resolve_references()
    placed.data.augment_on = place
    r = bench.time_train_step(placed, steps)
    if r["views_on_device"] != (place == "device"):
      raise AssertionError(f"data.augment_on={place} built a step with views_on_device={r['views_on_device']}.")
    result[f"{place}_step_ms"], result[f"{place}_step_cpu_ms"] = r["median_ms"], r["cpu_ms"]

  result.update(time_augmentation(config, steps))
  result["augment_share_pct"] = 100.0 * result["augment_ms"] / result["device_step_ms"]
  result["device_minus_host_pct"] = 100.0 * (result["device_step_ms"] - result["host_step_ms"]) / result[
      "device_step_ms"]
  return result


def time_augmentation(config, steps: int) -> dict:
  """The train step's augmentation alone (`device_augment.train_images` of the step's source batch, on one
  device): median ms (and CPU ms) and source images per second."""
  import jax
  from semi_jax import device_augment, sharding
  from semi_jax.tools import bench
  b, u = config.train.batch_size, config.train.batch_size * config.train.mu
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  batch = sharding.to_global(bench.synthetic_batch(np.random.default_rng(0), config, 10, views_on_device=True),
                             mesh)
  settings = device_augment.Settings.from_config(config.data)
  run = jax.jit(lambda images, positions, key: device_augment.train_images(images, positions, key, settings, b, u,
                                                                           1))
  key = jax.random.key(bench.STEP_SEED)
  positions = [batch["positions"] + i * (b + u) for i in range(4)]  # other positions, other draws
  times, cpu_times = [], []
  for i in range(bench.WARMUP_STEPS + steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(run(batch["images"], positions[i % 4], key))
    if i >= bench.WARMUP_STEPS:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  ms = bench.median_ms(times)
  return {"augment_ms": ms, "augment_cpu_ms": bench.median_ms(cpu_times),
          "device_source_images_per_s": (b + u) / (ms / 1000.0)}


def format_step(r: dict) -> str:
  return "\n".join([
      f"SeMi train step on 1 x {r['device']}, {r['labeled']} labeled + {r['unlabeled']} unlabeled source images of "
      f"{r['size']}x{r['size']} (median ms; CPU ms of this process):",
      f"  views from tf.data (host):   {r['host_step_ms']:9.1f} ms ({r['host_step_cpu_ms']:.1f} CPU ms); the "
      "pipeline's own CPU time comes on top",
      f"  views made in the step:      {r['device_step_ms']:9.1f} ms ({r['device_step_cpu_ms']:.1f} CPU ms)",
      f"  the step's augmentation alone: {r['augment_ms']:7.2f} ms ({r['augment_cpu_ms']:.2f} CPU ms) = "
      f"{r['augment_share_pct']:.1f}% of the device step, {r['device_source_images_per_s']:.0f} source images/s; "
      f"device step - host step = {r['device_minus_host_pct']:.1f}% of the device step"])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", default="1,2", help="comma-separated tf.data thread-pool sizes")
  parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
  parser.add_argument("--size", type=int, default=32, help="image side in pixels")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--where", default="host,device", help="comma-separated: host (tf.data), device (jax)")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed train steps with each kind of augmentation (0 skips the step measurement)")
  parser.add_argument("--quick", action="store_true", help="the tiny step config (WRN-10-1, 8x8, batch 8)")
  parser.add_argument("--cpu_fast_paths", default="auto", choices=("auto", "on", "off"),
                      help="semi_jax.cpu's speed-ups for the timed steps (auto: on exactly when the devices are CPUs)")
  args = parser.parse_args(argv)
  where = [w for w in args.where.split(",") if w]
  if not set(where) <= {"host", "device"} or args.steps < 0:
    raise SystemExit(f"semi_jax.tools.bench_augment: --where takes host and/or device (got {args.where!r}) and "
                     f"--steps must be >= 0 (got {args.steps}).")
  from semi_jax import startup
  startup.prepare(args.cpu_fast_paths)  # as semi_jax.main does, before JAX starts its threads
  import jax
  print(f"{args.size}x{args.size} uint8, batch {args.batch}, {os.cpu_count()} CPUs visible, JAX device: "
        f"{jax.devices()[0].device_kind}")
  if "host" in where:
    for threads in (int(t) for t in args.threads.split(",")):
      for views in VIEWS:
        rate, cpu_rate = measure(views, threads, seconds=args.seconds, size=args.size, batch=args.batch)
        print(f"host   threads={threads:<3d} views={views:<13s} {rate:8.0f} images/s {cpu_rate:8.0f} images/CPU-s")
  if "device" in where:
    for views in VIEWS:
      rate, cpu_rate = measure_device(views, seconds=args.seconds, size=args.size, batch=args.batch)
      print(f"device {jax.default_backend():<11s} views={views:<13s} {rate:8.0f} images/s {cpu_rate:8.0f} "
            "images/CPU-s")
  if args.steps:
    from semi_jax.tools import bench
    config = bench.bench_config("semi", args.quick, cpu_fast_paths=args.cpu_fast_paths)
    print(format_step(time_step_augmentation(config, args.steps)))


if __name__ == "__main__":
  main()
