"""host_malloc: when the malloc settings apply, and that they stop large freed buffers being page-faulted in
again (measured in a fresh interpreter, as a worker thread of XLA would allocate them). The suite itself runs with
glibc's defaults: only the training and benchmark entry points apply the settings."""
import os
import subprocess
import sys

import pytest

from semi_jax import host_malloc

CPU_ONLY = {"JAX_PLATFORMS": "cpu"}
no_plugins = lambda name: False


def test_applies_by_default_on_a_cpu_only_install():
  assert host_malloc.reason_to_skip({}, plugin_installed=no_plugins) is None
  assert host_malloc.reason_to_skip({"JAX_PLATFORMS": "cpu"}, plugin_installed=no_plugins) is None
  assert host_malloc.reason_to_skip({"SEMI_JAX_HOST_MALLOC": "auto"}, plugin_installed=no_plugins) is None


@pytest.mark.parametrize("environ, plugins, reason", [
    ({"SEMI_JAX_HOST_MALLOC": "default"}, (), "SEMI_JAX_HOST_MALLOC=default"),
    ({"MALLOC_ARENA_MAX": "4"}, (), "MALLOC_ARENA_MAX"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, (), "GLIBC_TUNABLES"),
    ({"JAX_PLATFORMS": "tpu"}, (), "JAX_PLATFORMS=tpu"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, (), "JAX_PLATFORMS=cuda,cpu"),
    ({}, ("jax_cuda12_plugin",), "jax_cuda12_plugin"),
])
def test_left_alone_where_the_user_or_an_accelerator_decides(environ, plugins, reason):
  assert reason in host_malloc.reason_to_skip(environ, plugin_installed=lambda name: name in plugins)


def test_cpu_platform_chosen_explicitly_wins_over_an_installed_plugin():
  assert host_malloc.reason_to_skip({"JAX_PLATFORMS": "cpu"}, plugin_installed=lambda name: True) is None


def test_unknown_switch_value_is_a_clear_error():
  with pytest.raises(ValueError, match="SEMI_JAX_HOST_MALLOC must be 'auto' or 'default'"):
    host_malloc.reason_to_skip({"SEMI_JAX_HOST_MALLOC": "on"})


_FAULTS_OF_A_REUSED_BUFFER = """
import ctypes, resource, threading
from semi_jax import host_malloc
host_malloc.apply()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def cycle():
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)  # touch every page
  libc.free(p)
faults = []
for _ in range(3):  # on a worker thread, as XLA's Eigen pool allocates
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t = threading.Thread(target=cycle); t.start(); t.join()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("STATUS", host_malloc.status)
print("FAULTS", faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("switch", ["auto", "default"])
def test_a_large_freed_buffer_is_reused_without_page_faults(switch):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
  env.update(CPU_ONLY, SEMI_JAX_HOST_MALLOC=switch)
  out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BUFFER], env=env, capture_output=True,
                       text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("STATUS", "FAULTS")))
  pages = (256 << 20) // 4096
  if switch == "auto":
    assert lines["STATUS"] == "one arena, no mmap, no trim"
    assert int(lines["FAULTS"]) < pages // 20  # the freed heap is reused: (almost) no page touched anew
  else:
    assert lines["STATUS"] == "glibc defaults: SEMI_JAX_HOST_MALLOC=default"
    assert int(lines["FAULTS"]) > pages // 2  # glibc unmapped it: every page faults in again


@pytest.mark.parametrize("module", ["semi_jax.main", "semi_jax.bench"])
def test_entry_points_report_a_bad_switch_in_one_line(module, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, SEMI_JAX_HOST_MALLOC="on", PYTHONPATH=root)
  args = ["--config=configs/test.py", f"--workdir={tmp_path}"] if module == "semi_jax.main" else ["--quick"]
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0
  assert "bad environment: SEMI_JAX_HOST_MALLOC must be 'auto' or 'default', got 'on'" in r.stderr
  assert "Traceback" not in r.stderr
