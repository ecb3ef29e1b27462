"""Runs `python -m semi_jax.main` (or `semi_jax.sweep`) as the processes of one multi-process job on this machine
(127.0.0.1, jax.distributed with gloo CPU collectives, fake CPU devices per process)."""
import os
import signal
import socket
import subprocess
import sys
import time

import jax

from semi_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_MAIN = os.path.join(REPO, "tests", "fault_main.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(port: int, process_id: int, processes: int, local_devices: int) -> dict:
  env = dict(os.environ)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env.update({
      "XLA_FLAGS": " ".join(xla_flags + [f"--xla_force_host_platform_device_count={local_devices}"]),
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(processes),
      "JAX_PROCESS_ID": str(process_id),
      # The numerics of tests/conftest.py, which the single-process references of these tests run under.
      "JAX_THREEFRY_PARTITIONABLE": "1",
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
      "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
      "TF_CPP_MIN_LOG_LEVEL": "3",
      "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
  })
  env.pop(distributed.SWITCH_VAR, None)
  return env


class Job:
  """The processes of one run; `fault` = (process id, kind) runs tests/fault_main.py in that process."""

  def __init__(self, workdir: str, logdir, flags=(), processes: int = 2, local_devices: int = 4, fault=None,
               name: str = "job", module: str = "semi_jax.main", config: str = "configs/test.py"):
    port = free_port()
    self.logs = [os.path.join(str(logdir), f"{name}_process_{i}.log") for i in range(processes)]
    self.procs = []
    for pid in range(processes):
      cmd = [sys.executable, "-m", module]
      if fault is not None and fault[0] == pid:
        cmd = [sys.executable, FAULT_MAIN, fault[1]]
      cmd += [f"--config={config}", f"--workdir={workdir}", *flags]
      with open(self.logs[pid], "w") as log:
        self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(port, pid, processes, local_devices),
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

  def signal(self, pid: int, signum=signal.SIGTERM) -> float:
    self.procs[pid].send_signal(signum)
    return time.monotonic()

  def wait(self, timeout: float) -> list:
    """Exit codes (None for a process killed after `timeout` s); every process is gone afterwards."""
    deadline = time.monotonic() + timeout
    exited = [None] * len(self.procs)
    try:
      for i, p in enumerate(self.procs):
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        exited[i] = time.monotonic()
    except subprocess.TimeoutExpired:
      pass
    codes = []
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        codes.append(None)
      else:
        codes.append(p.returncode)
    self.exit_times = exited
    return codes

  def output(self, pid: int) -> str:
    with open(self.logs[pid]) as f:
      return f.read()

  def describe(self) -> str:
    return "\n".join(f"--- process {i} (exit {p.returncode}) ---\n" + self.output(i)[-4000:]
                     for i, p in enumerate(self.procs))
