"""Throughput of the augmentation pipeline: images/s through tf.data on a given number of host threads.

  python -m semi_jax.tools.bench_augment [--threads 1,2] [--seconds 5] [--size 32] [--batch 64]

Measures the weak view alone (labeled stream) and one weak + two strong views (unlabeled stream, counted per
source image) over random uint8 images, after a warm-up that also pays the one-off graph tracing. Besides
wall-clock images/s it prints images per CPU-second of this process, which stays meaningful on a machine
shared with other jobs.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import tensorflow as tf

from semi_jax import augment

_WARMUP_BATCHES = 20


def _dataset(images: np.ndarray, views: str, threads: int, batch: int, seed: int) -> tf.data.Dataset:
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


def measure(views: str, threads: int, *, seconds: float = 5.0, size: int = 32, batch: int = 64,
            num_images: int = 4096, seed: int = 0) -> tuple[float, float]:
  """(images per wall-clock second, images per CPU-second) for `views` in {"weak", "weak+2strong"} on
  `threads` tf.data threads."""
  if views not in ("weak", "weak+2strong"):
    raise ValueError(f"views must be 'weak' or 'weak+2strong', got {views!r}.")
  if threads < 1:
    raise ValueError(f"threads must be >= 1, got {threads}.")
  images = np.random.default_rng(seed).integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
  iterator = iter(_dataset(images, views, threads, batch, seed))
  for _ in range(_WARMUP_BATCHES):
    next(iterator)
  batches = 0
  start, cpu_start = time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  return batches * batch / wall, batches * batch / cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", default="1,2", help="comma-separated tf.data thread-pool sizes")
  parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
  parser.add_argument("--size", type=int, default=32, help="image side in pixels")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  print(f"{args.size}x{args.size} uint8, batch {args.batch}, {os.cpu_count()} CPUs visible")
  for threads in (int(t) for t in args.threads.split(",")):
    for views in ("weak", "weak+2strong"):
      rate, cpu_rate = measure(views, threads, seconds=args.seconds, size=args.size, batch=args.batch)
      print(f"threads={threads:<3d} views={views:<13s} {rate:8.0f} images/s {cpu_rate:8.0f} images/CPU-s")


if __name__ == "__main__":
  main()
