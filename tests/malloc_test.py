"""malloc: when the malloc settings of the CPU fast paths apply, and that they stop large freed buffers being
page-faulted in again (measured in a fresh interpreter, as a worker thread of XLA would allocate them). The suite
itself runs with glibc's defaults: only the training and benchmark entry points apply the settings."""
import os
import subprocess
import sys

import pytest

from semi_jax.cpu import malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ONLY = {"JAX_PLATFORMS": "cpu"}
no_plugins = lambda name: False


def test_auto_applies_on_a_cpu_only_install():
  assert malloc.reason_to_skip("auto", {}, plugin_installed=no_plugins) is None
  assert malloc.reason_to_skip("auto", CPU_ONLY, plugin_installed=no_plugins) is None
  assert malloc.reason_to_skip(environ={}, plugin_installed=no_plugins) is None  # 'auto' is the default


@pytest.mark.parametrize("environ, plugins, reason", [
    ({"JAX_PLATFORMS": "tpu"}, (), "JAX_PLATFORMS=tpu"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, (), "JAX_PLATFORMS=cuda,cpu"),
    ({}, ("jax_cuda12_plugin",), "jax_cuda12_plugin"),
    ({}, ("libtpu",), "libtpu"),
])
def test_auto_leaves_malloc_alone_where_an_accelerator_may_compute(environ, plugins, reason):
  assert reason in malloc.reason_to_skip("auto", environ, plugin_installed=lambda name: name in plugins)


def test_auto_with_the_cpu_platform_chosen_explicitly_wins_over_an_installed_plugin():
  assert malloc.reason_to_skip("auto", CPU_ONLY, plugin_installed=lambda name: True) is None


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
@pytest.mark.parametrize("environ, reason", [
    ({"MALLOC_ARENA_MAX": "4"}, "MALLOC_ARENA_MAX"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
])
def test_left_alone_whatever_the_setting_where_the_user_configures_malloc(setting, environ, reason):
  want = "cpu_fast_paths=off" if setting == "off" else f"malloc configured by the user ({reason})"
  assert malloc.reason_to_skip(setting, environ, plugin_installed=no_plugins) == want


def test_glibc_tunables_of_other_parts_of_glibc_are_not_a_malloc_setting():
  assert malloc.reason_to_skip("auto", {"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"},
                               plugin_installed=no_plugins) is None


@pytest.mark.parametrize("environ, plugins", [({}, ()), ({"JAX_PLATFORMS": "tpu"}, ()),
                                              ({}, ("jax_cuda12_plugin",)), ({"JAX_PLATFORMS": "cuda"}, ("libtpu",))])
def test_off_always_skips(environ, plugins):
  assert malloc.reason_to_skip("off", environ, plugin_installed=lambda name: name in plugins) == "cpu_fast_paths=off"


@pytest.mark.parametrize("environ, plugins", [({}, ()), ({"JAX_PLATFORMS": "tpu"}, ()),
                                              ({"JAX_PLATFORMS": "cuda,cpu"}, ()), ({}, ("jax_cuda12_plugin",)),
                                              ({}, ("libtpu",))])
def test_on_applies_even_where_an_accelerator_may_compute(environ, plugins):
  assert malloc.reason_to_skip("on", environ, plugin_installed=lambda name: name in plugins) is None


@pytest.mark.parametrize("setting", ["fast", "default", "", "ON"])
def test_bad_setting_is_a_clear_error(setting):
  with pytest.raises(ValueError, match=r"cpu_fast_paths must be one of \('auto', 'on', 'off'\)"):
    malloc.reason_to_skip(setting, {}, plugin_installed=no_plugins)
  with pytest.raises(ValueError, match="cpu_fast_paths must be one of"):
    malloc.apply(setting)


_FAULTS_OF_A_REUSED_BUFFER = """
import ctypes, resource, sys, threading
from semi_jax.cpu import malloc
malloc.apply(sys.argv[1])
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
print("STATUS", malloc.status)
print("FAULTS", faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("setting", ["auto", "off"])
def test_a_large_freed_buffer_is_reused_without_page_faults(setting):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
  env.update(CPU_ONLY)
  out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BUFFER, setting], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("STATUS", "FAULTS")))
  pages = (256 << 20) // 4096
  if setting == "auto":
    assert lines["STATUS"] == "one arena, no mmap, no trim"
    assert int(lines["FAULTS"]) < pages // 20  # the freed heap is reused: (almost) no page touched anew
  else:
    assert lines["STATUS"] == "glibc defaults: cpu_fast_paths=off"
    assert int(lines["FAULTS"]) > pages // 2  # glibc unmapped it: every page faults in again


def run_entry_point(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


def test_main_reports_a_bad_setting_in_one_line(tmp_path):
  r = run_entry_point("semi_jax.main", "--config=configs/test.py", f"--workdir={tmp_path}",
                      "--config.cpu_fast_paths=fast")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, r.stderr
  assert "cpu_fast_paths" in lines[0] and "'fast'" in lines[0], lines[0]


def test_bench_rejects_a_bad_setting_as_an_invalid_choice():
  r = run_entry_point("semi_jax.tools.bench", "--quick", "--cpu_fast_paths=fast")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  assert "argument --cpu_fast_paths: invalid choice: 'fast'" in r.stderr, r.stderr[-2000:]
