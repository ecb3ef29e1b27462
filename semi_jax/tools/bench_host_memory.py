"""Peak host memory of the input pipeline: start-up (data set in memory, labeled / unlabeled split, tf.data tables)
and a few steps of train input, per process.

  python -m semi_jax.tools.bench_host_memory [--num_images=1281167] [--num_test=50000] [--image_size=32]
                                             [--processes=1,2] [--steps=50] [--config=PATH] [--sequential]
                                             [--cpu_fast_paths=off] [--unaligned] [--out=FILE.json]

The data set is synthetic and in memory: `--num_images` random uint8 training images (default: ImageNet-127's
1,281,167 at 32x32, ~3.9 GB) with ImageNet-127's long tail over 127 classes (286:1 from head to tail), and
`--num_test` test images, generated into preallocated arrays so that the source itself is held once. The split
and the streams are those of `--config` (default configs/imagenet127.py: 10 % of every class labeled, the rest
unlabeled). Every measurement runs in a fresh subprocess, so that its peak is its own: with `--processes=2` two
subprocesses compute the input of process 0 and 1 of 2 (`train_dataset(..., process_index=i, process_count=2)`),
each holding the whole data set as every host of a multi-host job does. They are independent processes, not a
jax.distributed job: the input pipeline needs none. They run at the same time unless `--sequential`.

Peaks are the kernel's high-water mark of resident memory (VmHWM), reset between phases where Linux allows it
(/proc/self/clear_refs), so each phase's peak is its own; the whole run's is the largest of them (else
getrusage's ru_maxrss). Each process prints the raw bytes of its data (images and labels, train and test), the
resident memory after imports (TensorFlow and JAX, before any data), and the peaks with their ratio to the raw
bytes. `--cpu_fast_paths=on` measures with the malloc settings of CPU training (`semi_jax.cpu.malloc`: freed
memory stays in the heap); the default 'off' is what an accelerator host runs. `--unaligned` allocates the
synthetic arrays with plain numpy instead of `datasets.aligned_empty`, as a source that does not align them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from semi_jax import files  # light: os and json only

IMAGENET127_TRAIN, IMAGENET127_TEST, IMAGENET127_CLASSES = 1_281_167, 50_000, 127
TAIL_RATIO = 286.0  # ImageNet-127's largest over smallest training class
_RESULT = "RESULT "  # prefix of a worker's JSON line on stdout
_FILL_CHUNK = 8192  # images generated per chunk: bounds the generator's transient memory


def _status_bytes(field: str) -> int:
  """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where there is none (not Linux)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _reset_peak() -> bool:
  """Resets VmHWM to the current resident size; False where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _max_rss_bytes() -> int:
  # ru_maxrss is in kilobytes on Linux, bytes on macOS.
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r if sys.platform == "darwin" else r * 1024


def long_tail_labels(num_images: int, num_classes: int, ratio: float, seed: int, min_count: int = 1):
  """int64 labels of `num_images` examples in shuffled order, class c holding ~ratio^(-c/(C-1)) of the head
  class's count (every class at least `min_count` examples)."""
  import numpy as np
  if num_images < num_classes * min_count:
    raise ValueError(f"--num_images={num_images} must be at least {num_classes * min_count}: {min_count} for "
                     f"every one of the {num_classes} classes.")
  weights = ratio ** (-np.arange(num_classes) / max(num_classes - 1, 1))
  spare = num_images - num_classes * min_count  # shared out by the weights on top of every class's minimum
  counts = min_count + np.floor(weights / weights.sum() * spare).astype(np.int64)
  counts[0] += num_images - counts.sum()
  return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes, dtype=np.int64), counts))


def random_images(n: int, size: int, seed: int, aligned: bool = True):
  """n random uint8 images [n, size, size, 3], filled chunk by chunk into one preallocated array (every page
  written, so all of it is resident), allocated as the loaders allocate theirs (`datasets.aligned_empty`) unless
  not `aligned`."""
  import numpy as np

  from semi_jax import datasets
  shape = (n, size, size, 3)
  images = datasets.aligned_empty(shape, np.uint8) if aligned else np.empty(shape, np.uint8)
  rng = np.random.default_rng(seed)
  for start in range(0, n, _FILL_CHUNK):
    stop = min(start + _FILL_CHUNK, n)
    images[start:stop] = np.frombuffer(rng.bytes((stop - start) * size * size * 3), np.uint8).reshape(
        (stop - start, size, size, 3))
  return images


def synthetic_dataset(num_images: int, num_test: int, size: int, num_classes: int = IMAGENET127_CLASSES,
                      seed: int = 0, aligned: bool = True, min_count: int = 1):
  """An ImageNet-127-like `ArrayDataset` of random pixels with a long-tailed training set (at least
  `min_count` images a class)."""
  import numpy as np

  from semi_jax.datasets import ArrayDataset
  return ArrayDataset(name="synthetic_imagenet127", num_classes=num_classes,
                      train_images=random_images(num_images, size, seed, aligned),
                      train_labels=long_tail_labels(num_images, num_classes, TAIL_RATIO, seed, min_count),
                      test_images=random_images(num_test, size, seed + 1, aligned),
                      test_labels=np.arange(num_test, dtype=np.int64) % num_classes,  # balanced
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def raw_bytes(dataset) -> int:
  """Bytes of the data set's arrays as loaded: what every process holds at least."""
  arrays = (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels,
            dataset.extra_unlabeled_images)
  return sum(a.nbytes for a in arrays if a is not None)


def measure(args, process_index: int, process_count: int) -> dict:
  """One process's figures (run it in a fresh process: its peaks are the process's)."""
  from semi_jax import config_files, startup
  from semi_jax.cpu import malloc
  startup.prepare(args.cpu_fast_paths)
  from semi_jax import input_pipeline
  config = config_files.load(args.config or config_files.repo_config("imagenet127"))
  config.data.image_size = args.image_size
  if args.batch_size:
    config.train.batch_size = args.batch_size
  config.train.total_steps = max(int(config.train.total_steps), args.steps + 1)
  result = {"process_index": process_index, "process_count": process_count, "baseline": _status_bytes("VmRSS")}
  phases = {}
  resettable = _reset_peak()

  def now():
    return time.time(), time.process_time()

  def phase_end(name, since):
    rss = _status_bytes("VmRSS")  # first: tf.data threads may still allocate between the two reads
    phases[name] = {"peak": max(_status_bytes("VmHWM"), rss), "rss": rss,
                    "seconds": time.time() - since[0], "cpu_seconds": time.process_time() - since[1]}
    if resettable:
      _reset_peak()

  t0 = now()
  # A small --num_images leaves tail classes too small for the split to label one of their images.
  fraction = float(config.data.labeled_fraction)
  dataset = synthetic_dataset(args.num_images, args.num_test, args.image_size, seed=args.seed,
                              aligned=not args.unaligned, min_count=int(0.5 / fraction) + 1 if fraction > 0 else 1)
  result["raw"] = raw_bytes(dataset)
  result["data_rss"] = _status_bytes("VmRSS")  # the data set in memory, nothing else built yet
  data = input_pipeline.make_ssl_data(dataset, config.data, config.seed)
  del dataset  # the run keeps it through `data` only
  ds = input_pipeline.train_dataset(data, config, process_index=process_index, process_count=process_count)
  batches = input_pipeline.as_numpy(ds)
  phase_end("startup", t0)
  t0 = now()
  local = 0
  for _ in range(args.steps):
    local = len(next(batches)["y"])
  phase_end("input_steps", t0)
  t0 = now()
  d = data.dataset
  for _ in input_pipeline.eval_batches(d.test_images, d.test_labels, config.train.eval_batch_size,
                                       process_index=process_index, process_count=process_count):
    pass
  phase_end("eval_input", t0)
  # Resetting VmHWM resets ru_maxrss too: the run's peak is the largest phase's.
  peak = max([_max_rss_bytes()] + [p["peak"] for p in phases.values()])
  result.update(phases=phases, peak=peak, resettable=resettable, steps=args.steps,
                labeled_per_step=local, labeled=len(data.labeled_idx), malloc=malloc.status)
  return result


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f} GB"


def format_process(r: dict) -> str:
  raw, p = r["raw"], r["phases"]
  head = (f"process {r['process_index']}/{r['process_count']}: raw data {_gb(raw)} ({raw:,} bytes), "
          f"after imports {_gb(r['baseline'])}, with the data set {_gb(r['data_rss'])}; malloc {r['malloc']}")
  lines = [head]
  names = {"startup": "start-up peak", "input_steps": f"input-steps peak ({r['steps']} steps)",
           "eval_input": "eval-input peak"}
  for key, label in names.items():
    lines.append(f"  {label:<28s} {_gb(p[key]['peak']):>9s}  peak/raw {p[key]['peak'] / raw:5.2f}  "
                 f"(peak - after imports)/raw {(p[key]['peak'] - r['baseline']) / raw:5.2f}  "
                 f"{p[key]['seconds']:6.1f} s {p[key]['cpu_seconds']:6.1f} CPU-s")
  lines.append(f"  {'whole run peak':<28s} {_gb(r['peak']):>9s}  peak/raw {r['peak'] / raw:5.2f}")
  if not r["resettable"]:
    lines.append("  (the peak could not be reset between phases: each phase's peak includes the earlier ones)")
  return "\n".join(lines)


def _worker_command(args, process_index: int, process_count: int) -> list[str]:
  cmd = [sys.executable, "-m", "semi_jax.tools.bench_host_memory", f"--num_images={args.num_images}",
         f"--num_test={args.num_test}", f"--image_size={args.image_size}", f"--steps={args.steps}",
         f"--seed={args.seed}", f"--batch_size={args.batch_size}", f"--cpu_fast_paths={args.cpu_fast_paths}",
         f"--worker={process_index}/{process_count}"]
  return cmd + ([f"--config={args.config}"] if args.config else []) + (["--unaligned"] if args.unaligned else [])


def run_processes(args, process_count: int) -> list[dict]:
  """The figures of `process_count` worker subprocesses, process 0 first."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  def start(i):
    return subprocess.Popen(_worker_command(args, i, process_count), stdout=subprocess.PIPE, text=True, env=env)

  def finish(proc, i):
    out, _ = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith(_RESULT)]
    if proc.returncode or not lines:
      raise SystemExit(f"semi_jax.tools.bench_host_memory: process {i}/{process_count} failed "
                       f"(exit status {proc.returncode}); its output:\n{out}")
    return json.loads(lines[-1][len(_RESULT):])

  if args.sequential:
    return [finish(start(i), i) for i in range(process_count)]
  procs = [start(i) for i in range(process_count)]
  return [finish(p, i) for i, p in enumerate(procs)]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=IMAGENET127_TRAIN, help="training images (the pool)")
  parser.add_argument("--num_test", type=int, default=IMAGENET127_TEST, help="test images")
  parser.add_argument("--image_size", type=int, default=32, help="image side in pixels")
  parser.add_argument("--processes", default="1,2", help="comma-separated process counts to measure")
  parser.add_argument("--steps", type=int, default=50, help="train batches pulled per process")
  parser.add_argument("--batch_size", type=int, default=0, help="global labeled batch (0: the config's)")
  parser.add_argument("--config", default=None, metavar="PATH",
                      help="config of the split and streams (default: configs/imagenet127.py of this checkout)")
  parser.add_argument("--cpu_fast_paths", default="off", choices=("auto", "on", "off"),
                      help="apply CPU training's malloc settings (semi_jax.cpu.malloc) in the workers")
  parser.add_argument("--sequential", action="store_true",
                      help="run the processes of a count one after another (same per-process figures, less "
                           "memory for the machine)")
  parser.add_argument("--unaligned", action="store_true",
                      help="allocate the synthetic arrays with plain numpy, as a source that does not use "
                           "datasets.aligned_empty (the pipeline then copies them into tables)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
  parser.add_argument("--out", default="", help="also write the figures to this JSON file")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "i/n": measure in this process
  args = parser.parse_args(argv)
  if args.worker:
    index, count = (int(v) for v in args.worker.split("/"))
    try:
      result = measure(args, index, count)
    except ValueError as e:
      raise SystemExit(f"semi_jax.tools.bench_host_memory: {e}") from None
    print(_RESULT + json.dumps(result), flush=True)
    return
  counts = [int(c) for c in args.processes.split(",") if c]
  print(f"synthetic ImageNet-127-like data: {args.num_images:,} train + {args.num_test:,} test images "
        f"{args.image_size}x{args.image_size}x3 uint8, {IMAGENET127_CLASSES} classes; every process holds all "
        "of it", flush=True)
  results = {}
  for count in counts:
    print(f"\n{count} process(es){', one after another' if args.sequential and count > 1 else ''}:", flush=True)
    results[count] = run_processes(args, count)
    for r in results[count]:
      print(format_process(r), flush=True)
  if args.out:
    files.write_json_atomic(args.out, {str(k): v for k, v in results.items()})


if __name__ == "__main__":
  main()
