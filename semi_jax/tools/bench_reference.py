"""semi_jax's train step side by side with the PyTorch reference (pywin/SeMi), in one run, step by step.

  python -m semi_jax.tools.bench_reference --reference_repo=PATH --torch_python=PATH [--rounds=15] [--algo=semi]
                                           [--threads=2] [--torch_device=cpu|cuda] [--out=bench_reference.json]

Three worker processes each hold one warm step: semi_jax's compiled train step (the `semi_jax.tools.bench`
configuration: WRN-28-2, 64 labeled + 3 x 64 unlabeled 32x32 images, past the warm-up epochs), the reference's
full training iteration and its forward+backward+SGD core (`semi_jax/tools/reference_worker.py`, run with
`--torch_python`, an interpreter that has torch; the reference code comes from `--reference_repo`, a checkout of
pywin/SeMi). Every round runs one step of each, in an order that rotates from round to round, and only one process
computes at a time: on a shared machine whose speed drifts by 5-10 % from minute to minute, separate runs a few
minutes apart cannot resolve a few per cent, alternating steps can. The report gives each worker's median, min and
max, and the ratio semi_jax / reference both as the ratio of medians and as the median of the per-round ratios.

On a GPU machine pass `--torch_device=cuda`: semi_jax's step runs on JAX's default backend (the GPU) and the
reference on the same GPU. The three processes then share the GPU, so the JAX worker allocates memory as it needs
it instead of taking 75 % of the GPU up front.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from semi_jax import files  # light: os and json only

OURS = "semi_jax"
WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_worker.py")
READY, MS = "@ready", "@ms"


class WorkerError(RuntimeError):
  """A worker process stopped or broke the protocol; the message carries the end of its stderr."""


class Worker:
  """A process that prints `@ready {json}` once warm, then `@ms <float>` for every line it reads."""

  def __init__(self, name: str, argv: list[str], env: dict | None = None):
    self.name = name
    self._stderr = tempfile.TemporaryFile(mode="w+")
    self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                  text=True, env=env)
    try:
      self.info = json.loads(self._read(READY) or "{}")
    except BaseException:
      self.close()
      raise

  def _read(self, prefix: str) -> str:
    """The rest of the next stdout line that starts with `prefix`; other lines are the worker's own output."""
    for line in self._proc.stdout:
      if line.startswith(prefix):
        return line[len(prefix):].strip()
    self._proc.wait()
    self._stderr.seek(0)
    tail = self._stderr.read()[-3000:]
    raise WorkerError(f"the {self.name} worker exited (code {self._proc.returncode}) before printing "
                      f"'{prefix}'; the end of its stderr:\n{tail}")

  def step(self) -> float:
    """Runs one step in the worker; its wall time in milliseconds."""
    try:
      self._proc.stdin.write("step\n")
      self._proc.stdin.flush()
    except BrokenPipeError:
      pass  # it has exited: _read reports how
    return float(self._read(MS))

  def close(self) -> None:
    if self._proc.poll() is None:
      try:
        self._proc.stdin.close()  # the worker's loop ends at the end of its stdin
      except BrokenPipeError:
        pass
      try:
        self._proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
      if not stream.closed:
        try:
          stream.close()
        except BrokenPipeError:
          pass


def alternate(workers: dict[str, Worker], rounds: int) -> dict[str, list[float]]:
  """`rounds` steps of every worker, one at a time; round r starts with worker r mod len(workers)."""
  names = list(workers)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(workers[name].step())
  return times


def summarise(times: dict[str, list[float]], ours: str = OURS) -> dict:
  """Per-worker median/min/max (ms) and, for every other worker, the ratios ours / it."""
  result = {"workers": {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "steps": len(t)}
                        for name, t in times.items()},
            "ratios": {}}
  for name, theirs in times.items():
    if name == ours:
      continue
    per_round = [a / b for a, b in zip(times[ours], theirs)]
    result["ratios"][name] = {
        "ratio_of_medians": statistics.median(times[ours]) / statistics.median(theirs),
        "median_per_round_ratio": statistics.median(per_round), "min_per_round_ratio": min(per_round),
        "max_per_round_ratio": max(per_round), "rounds_below_1": sum(r < 1.0 for r in per_round),
        "rounds": len(per_round)}
  return result


def format_report(result: dict, ours: str = OURS) -> str:
  lines = [f"{'worker':<22}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'steps':>7}"]
  for name, w in result["workers"].items():
    lines.append(f"{name:<22}{w['median_ms']:>11.1f}{w['min_ms']:>10.1f}{w['max_ms']:>10.1f}{w['steps']:>7}")
  for name, r in result["ratios"].items():
    lines.append(f"{ours} / {name}: {r['ratio_of_medians']:.3f} (ratio of medians); per round: median "
                 f"{r['median_per_round_ratio']:.3f}, min {r['min_per_round_ratio']:.3f}, max "
                 f"{r['max_per_round_ratio']:.3f}, below 1.0 in {r['rounds_below_1']} of {r['rounds']} rounds")
  return "\n".join(lines)


def jax_worker(algo: str, quick: bool) -> None:
  """The semi_jax side of the protocol: one compiled train step per line on stdin."""
  from semi_jax import startup
  startup.prepare("auto")  # before JAX starts its threads, as semi_jax.tools.bench does
  from semi_jax.tools import bench

  config = bench.bench_config(algo, quick)
  step = bench.compiled_train_step(config)
  i = 0

  def run_one() -> float:
    nonlocal i
    start = time.perf_counter()
    step.run(i)
    i += 1
    return 1000.0 * (time.perf_counter() - start)

  for _ in range(bench.WARMUP_STEPS):
    run_one()
  info = dict(bench.environment(config), algo=algo, quick=quick, compile_s=step.compile_s)
  print(f"{READY} {json.dumps(info)}", flush=True)
  for _ in sys.stdin:
    print(f"{MS} {run_one():.3f}", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference_repo", help="checkout of the reference code (pywin/SeMi)")
  parser.add_argument("--torch_python", help="python interpreter that has torch installed")
  parser.add_argument("--rounds", type=int, default=15, help="steps per worker")
  parser.add_argument("--algo", default="semi", help="semi_jax algorithm preset to time")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch threads (semi_jax's XLA uses every core)")
  parser.add_argument("--torch_device", choices=("cpu", "cuda"), default="cpu",
                      help="where the reference runs (cuda: the GPU that JAX uses too)")
  parser.add_argument("--out", default="bench_reference.json", help="JSON output file")
  parser.add_argument("--worker", choices=("jax",), help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker == "jax":
    return jax_worker(args.algo, args.quick)
  if not args.reference_repo or not os.path.isfile(os.path.join(args.reference_repo, "train_semi.py")):
    raise SystemExit(f"semi_jax.tools.bench_reference: --reference_repo={args.reference_repo} is not a checkout of "
                     "pywin/SeMi (no train_semi.py there); clone it and pass its path.")
  if not args.torch_python or not os.access(args.torch_python, os.X_OK):
    raise SystemExit(f"semi_jax.tools.bench_reference: --torch_python={args.torch_python} is not an executable; pass "
                     "the python of an environment with torch (e.g. a venv with `pip install torch numpy`).")
  if args.rounds < 1:
    raise SystemExit(f"semi_jax.tools.bench_reference: --rounds must be >= 1, got {args.rounds}.")
  reference = [args.torch_python, WORKER_SCRIPT, f"--repo={args.reference_repo}", f"--threads={args.threads}",
               f"--device={args.torch_device}"]
  jax_env = None
  if args.torch_device == "cuda":
    jax_env = dict(os.environ)
    jax_env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  workers = {}
  try:
    workers[OURS] = Worker(OURS, [sys.executable, "-m", "semi_jax.tools.bench_reference", "--worker=jax",
                                  f"--algo={args.algo}"], env=jax_env)
    workers["reference_full"] = Worker("reference_full", reference + ["--mode=full"])
    workers["reference_core"] = Worker("reference_core", reference + ["--mode=core"])
    times = alternate(workers, args.rounds)
  except WorkerError as e:
    raise SystemExit(f"semi_jax.tools.bench_reference: {e}") from None
  finally:
    for worker in workers.values():
      worker.close()
  result = summarise(times)
  result.update(times_ms=times, info={name: w.info for name, w in workers.items()}, host=platform.platform(),
                cpu_count=os.cpu_count())
  print(format_report(result))
  files.write_json_atomic(args.out, result)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
