"""semi_jax.workdir: one writer per workdir, on a local disk (flock, with real processes) and on TF's in-memory
ram:// file system (which stands in for gs://: heartbeat, TTL, settle delay and read-back)."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest

from semi_jax import distributed, files, workdir
from semi_jax.workdir import LEASE_FILE, Holder, LeaseLostError, Lease, Leases, WorkdirBusyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"settle_s": 0.1}  # the settle delay of remote leases in these tests
HOLD = """
import sys
from semi_jax import workdir
lease = workdir.Lease(sys.argv[1]).acquire()
print("held", flush=True)
if sys.stdin.readline().strip() == "release":
  lease.release()
"""
TAKE_ONCE = "import sys; from semi_jax import workdir; workdir.Lease(sys.argv[1]).acquire()"


def _python(code: str, directory, **kwargs) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _holder_process(directory) -> subprocess.Popen:
  """A process that holds the lease of `directory` until it reads "release" (then releases it and exits)."""
  proc = _python(HOLD, directory)
  line = proc.stdout.readline()
  if line.strip() != "held":
    proc.kill()
    raise AssertionError(f"the holder process did not take the lease: {line!r} {proc.communicate()[1]}")
  return proc


def _snapshot(root: str) -> dict:
  """Every file under `root` with its bytes (and, locally, its modification time)."""
  out = {}
  if files.is_remote(root):
    for parent, _, names in files._gfile().walk(root):
      for name in names:
        out[files.join(parent, name)] = files.read_bytes(files.join(parent, name))
    return out
  for parent, _, names in os.walk(root):
    for name in names:
      path = os.path.join(parent, name)
      out[path] = (files.read_bytes(path), os.stat(path).st_mtime_ns)
  return out


def _takeovers(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Took over the lease")]


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
  return str(tmp_path / "runs") if request.param == "local" else request.getfixturevalue("ram_dir")


# Local disks: flock, real processes.


def test_two_processes_on_one_local_directory(tmp_path, caplog):
  directory = tmp_path / "run"
  first = _holder_process(directory)
  try:
    with pytest.raises(WorkdirBusyError) as refused:
      Lease(str(directory)).acquire()
    message = str(refused.value)
    assert f"pid {first.pid} on host {socket.gethostname()}" in message, message
    assert message.startswith(f"{directory} is in use by another run (") and "\n" not in message
    assert "running -c " in message  # its command line (python -c ...)
    assert message.endswith("; wait for it to finish or stop it; to run a second experiment use another --workdir.")
    assert refused.value.holder.pid == first.pid and refused.value.directory == str(directory)
    second = _python(TAKE_ONCE, directory)  # another real process is refused too
    _, err = second.communicate(timeout=30)
    assert second.returncode != 0 and "WorkdirBusyError" in err and f"pid {first.pid} on host" in err, err
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()

  with caplog.at_level(logging.WARNING):
    lease = Lease(str(directory)).acquire()  # the kernel dropped the killed holder's lock
  assert _takeovers(caplog) == [f"Took over the lease of {directory} from {refused.value.holder.describe()}, "
                                "which is no longer running."]
  assert json.loads(files.read_text(str(directory / LEASE_FILE)))["pid"] == os.getpid()
  lease.release()
  assert files.read_text(str(directory / LEASE_FILE)) == ""  # emptied, never deleted

  third = _holder_process(directory)  # after a clean release: no warning
  _, err = third.communicate("release\n", timeout=30)
  assert third.returncode == 0 and "Took over" not in err, err
  caplog.clear()
  with caplog.at_level(logging.WARNING), Lease(str(directory)) as lease:
    assert lease.held and lease.holder.pid == os.getpid()
  assert not _takeovers(caplog) and not lease.held

  last = _python(TAKE_ONCE, directory)  # takes it and exits without release(): released at exit
  _, err = last.communicate(timeout=30)
  assert last.returncode == 0 and "Took over" not in err, err
  assert files.read_text(str(directory / LEASE_FILE)) == ""


def test_a_free_lock_with_a_previous_holder_on_another_host_is_taken_over(tmp_path, caplog):
  directory = str(tmp_path / "run")
  lease = Lease(directory, host="host-a").acquire()
  fd, lease._fd = lease._fd, None
  os.close(fd)  # as if its process had died without releasing: the lock is free, its info stays
  lease.release()  # (nothing left to release)
  with caplog.at_level(logging.WARNING), Lease(directory):
    pass
  [warning] = _takeovers(caplog)
  assert "on host host-a" in warning and warning.endswith("its lock was free, so that run has ended."), warning


def test_one_process_cannot_hold_a_local_lease_twice(tmp_path):
  directory = str(tmp_path / "run")
  with Lease(directory) as lease:
    with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()} on host"):
      Lease(directory + "/").acquire()
    with pytest.raises(RuntimeError, match="already held by this Lease; release it first"):
      lease.acquire()
    lease.check()  # a local lease cannot be lost


# Both file systems.


def test_acquiring_creates_only_the_lease_file(root):
  directory = files.join(root, "run")  # missing: a first run starts from nothing
  with Lease(directory, **FAST) as lease:
    assert files.listdir(directory) == [LEASE_FILE]
    on_disk = json.loads(files.read_text(files.join(directory, LEASE_FILE)))
    assert on_disk["token"] == lease.holder.token and on_disk["pid"] == os.getpid()
    assert on_disk["host"] == socket.gethostname() and on_disk["argv"] == sys.argv
  assert files.listdir(directory) == ([] if files.is_remote(root) else [LEASE_FILE])


def test_a_refused_acquire_changes_no_byte_of_the_holders_files(root):
  directory = files.join(root, "run")
  with Lease(directory, **FAST):
    files.makedirs(files.join(directory, "checkpoints", "100"))
    files.write_text_atomic(files.join(directory, "checkpoints", "100", "state"), "weights")
    files.append_line(files.join(directory, "eval.jsonl"), '{"step": 100}')
    before = _snapshot(root)
    time.sleep(0.01)  # so that a write would show in a modification time
    for _ in range(2):
      with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()} on host"):
        Lease(directory, **FAST).acquire()
    with pytest.raises(WorkdirBusyError):
      workdir.acquire_all([files.join(root, "other"), directory], **FAST)
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if "/other/" not in k} == before


# ram:// (gs://): heartbeat, TTL, settle delay.


def test_a_fresh_remote_lease_refuses_until_its_heartbeat_is_ttl_old(ram_dir, caplog):
  now = [1000.0]
  holder = Lease(ram_dir, host="host-a", clock=lambda: now[0], **FAST).acquire()
  now[0] += 599  # 1 s short of the TTL
  with pytest.raises(WorkdirBusyError) as refused:
    Lease(ram_dir, clock=lambda: now[0], **FAST).acquire()
  message = str(refused.value)
  assert message.startswith(f"{ram_dir} is in use by another run (pid {os.getpid()} on host host-a, started ")
  assert ", last heartbeat 10 min ago); wait for it to finish or stop it" in message, message

  now[0] += 2  # now stale: the holder is presumed dead
  with caplog.at_level(logging.WARNING):
    taker = Lease(ram_dir, clock=lambda: now[0], **FAST).acquire()
  [warning] = _takeovers(caplog)
  assert f"from pid {os.getpid()} on host host-a" in warning and "its last heartbeat is 10 min old" in warning
  assert json.loads(files.read_text(files.join(ram_dir, LEASE_FILE)))["token"] == taker.holder.token
  holder.release()  # no longer its lease: left alone
  assert json.loads(files.read_text(files.join(ram_dir, LEASE_FILE)))["token"] == taker.holder.token
  taker.release()
  assert not files.exists(files.join(ram_dir, LEASE_FILE))


def test_a_remote_lease_of_a_dead_pid_on_this_host_is_taken_over_at_once(ram_dir, caplog):
  dead = Lease(ram_dir, pid=999_999_999, **FAST).acquire()  # written by "another process" of this host
  with pytest.raises(WorkdirBusyError, match="pid 999999999 on host"):
    Lease(ram_dir, host="host-b", pid_alive=lambda pid: False, **FAST).acquire()  # other host: cannot tell
  with pytest.raises(WorkdirBusyError, match="pid 999999999 on host"):
    Lease(ram_dir, pid_alive=lambda pid: True, **FAST).acquire()  # this host, but the pid is alive
  with caplog.at_level(logging.WARNING):
    taker = Lease(ram_dir, pid_alive=lambda pid: pid != 999_999_999, **FAST).acquire()
  [warning] = _takeovers(caplog)
  assert "from pid 999999999 on host" in warning and warning.endswith("which is no longer running."), warning
  dead.release()
  taker.release()


def test_two_acquirers_that_both_found_no_lease_leave_one_winner(ram_dir):
  first = Lease(ram_dir, settle=lambda seconds: second._write_claim(), **FAST)
  second = Lease(ram_dir, **FAST)
  second._look_remote()  # it looked before `first` wrote: free
  # `first` writes, then `second` writes (in `first`'s settle delay), then `first` reads back `second`'s token.
  with pytest.raises(WorkdirBusyError) as refused:
    first.acquire()
  assert str(refused.value).endswith(", which took it at the same time); wait for it to finish or stop it; to run "
                                     "a second experiment use another --workdir.")
  assert refused.value.holder.token == second.holder.token and not first.held
  second._confirm()  # `second` reads back its own token
  assert second.held and files.listdir(ram_dir) == [LEASE_FILE]
  second.release()


def test_concurrent_remote_acquirers_leave_exactly_one_winner(ram_dir):
  outcomes, go = [], threading.Barrier(4)

  def acquire():
    go.wait()
    try:
      outcomes.append(Lease(ram_dir, settle_s=0.5).acquire())
    except WorkdirBusyError as e:
      outcomes.append(e)

  threads = [threading.Thread(target=acquire) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [o for o in outcomes if isinstance(o, Lease)]
  assert len(outcomes) == 4 and len(winners) == 1, outcomes
  on_disk = json.loads(files.read_text(files.join(ram_dir, LEASE_FILE)))
  assert on_disk["token"] == winners[0].holder.token
  winners[0].release()


def test_the_heartbeat_refreshes_the_lease_and_finds_a_takeover(ram_dir):
  path = files.join(ram_dir, LEASE_FILE)
  lease = Lease(ram_dir, ttl_s=0.2, **FAST).acquire()
  first_beat = lease.holder.heartbeat
  deadline = time.monotonic() + 5
  while json.loads(files.read_text(path))["heartbeat"] == first_beat:
    assert time.monotonic() < deadline, "the heartbeat did not refresh the lease"
    time.sleep(0.02)
  lease.check()
  assert files.listdir(ram_dir) == [LEASE_FILE]  # no temporary file left behind

  other = Holder(host="host-b", pid=7, started=time.time(), argv=("train", "--workdir", ram_dir), token="b" * 32,
                 heartbeat=time.time())
  files.write_json_atomic(path, other.to_json())  # another run took over (say this one had stalled)
  with pytest.raises(LeaseLostError) as lost:
    while time.monotonic() < deadline:
      lease.check()
      time.sleep(0.02)
  assert isinstance(lost.value, WorkdirBusyError) and lost.value.holder == other
  message = str(lost.value)
  assert message.startswith(f"{ram_dir}: this run lost its lease on the directory: {path} now names pid 7 on host "
                            "host-b") and "Stop this run" in message and "\n" not in message, message
  lease.release()  # not ours any more: left alone
  assert Holder.parse(files.read_text(path)) == other


def test_files_remove(root):
  files.makedirs(root)
  path = files.join(root, "f.txt")
  files.write_text_atomic(path, "x")
  assert files.remove(path) is True and not files.exists(path)
  assert files.remove(path) is False  # already gone: fine


# Several directories, jobs.


def test_acquire_all_is_all_or_nothing(root):
  a, b, c = (files.join(root, name) for name in "abc")
  busy = Lease(b, **FAST).acquire()
  with pytest.raises(WorkdirBusyError, match=f"^{b} is in use"):
    workdir.acquire_all([c, b, a], **FAST)
  if files.is_remote(root):
    assert not files.exists(files.join(a, LEASE_FILE))  # a was taken (sorted order) and given back
  busy.release()
  with workdir.acquire_all([c, b, a, a + "/"], **FAST) as leases:
    assert leases.directories == sorted(leases.directories) and len(leases) == 3
    assert all(lease.held for lease in leases)
    leases.check()
  assert not any(lease.held for lease in leases)
  workdir.acquire_all([a, b, c], **FAST).release()  # all free again


def test_acquire_for_job_in_one_process_is_acquire_all(root):
  a, b = files.join(root, "run"), files.join(root, "group")
  assert jax.process_count() == 1
  leases = workdir.acquire_for_job([a, b], **FAST)
  assert isinstance(leases, Leases) and leases.directories == sorted([a, b])
  with pytest.raises(WorkdirBusyError, match=f"^{a} is in use"):
    workdir.acquire_for_job([a], **FAST)
  leases.check()
  leases.release()
  workdir.acquire_for_job([a], **FAST).release()


def test_acquire_for_job_gives_every_process_process_0s_outcome(tmp_path, monkeypatch):
  """Process 0's decision as the other processes of a job receive it (the exchange itself is distributed's)."""
  directory = str(tmp_path / "run")
  published = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(distributed, "agreed", lambda name, value: published.append(value) or value)
  with Lease(directory):
    with pytest.raises(WorkdirBusyError) as refused:
      workdir.acquire_for_job([directory])
  assert published[-1]["ok"] is False and published[-1]["busy"] is True
  leases = workdir.acquire_for_job([directory])
  assert published[-1] == {"ok": True} and len(leases) == 1
  leases.release()

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  for outcome in published:
    monkeypatch.setattr(distributed, "agreed", lambda name, value, outcome=outcome: outcome)
    if outcome["ok"]:
      assert len(workdir.acquire_for_job([directory])) == 0  # nothing held on process 1
      continue
    with pytest.raises(WorkdirBusyError) as also_refused:
      workdir.acquire_for_job([directory])
    assert str(also_refused.value) == str(refused.value)
    assert also_refused.value.holder == refused.value.holder and also_refused.value.directory == directory
  assert files.read_text(os.path.join(directory, LEASE_FILE)) == ""  # process 1 touched nothing
