"""One writer per workdir: an exclusive lease on a directory.

Two runs started on one workdir would both train, interleave their eval logs, and the start-up clean-up of one
could delete the other's checkpoints. So a run takes a lease on its workdir before it writes there (a sweep: on
every run's directory and on its group directory, `acquire_all`), and a second run is refused with
`WorkdirBusyError`, whose message names the holder (host, pid, start time, command line) and what to do.

The lease is the file `lease.json` in the directory: the holder's host name, pid, start time, command line and a
random token, as JSON. Taking a lease creates that file and nothing else (and the directory itself when it is
missing: a first run starts from nothing); a refused run only reads it, so it changes nothing the holder wrote.

Local paths: `fcntl.flock(LOCK_EX | LOCK_NB)` on lease.json, held open for the holder's lifetime.
  * Guarantee: at most one live holder per directory among the processes of this machine (and of every machine
    mounting the directory where flock spans clients, as on Linux NFS; a FUSE mount such as gcsfuse locks within
    one machine only: give runs on several machines a gs:// workdir). The kernel drops the lock when the holder
    dies, however it dies (SIGKILL, out of memory), so there are no stale leases: the next run takes over and
    logs a warning naming the previous holder. The file is never deleted (deleting lock files races): releasing
    empties it and unlocks.
  * The lock belongs to the open file: a child process forked without exec shares it and keeps it until it
    exits. `check()` does nothing: a lock cannot be lost.

Remote paths (gs://; TF's in-memory ram:// in the tests): there is no lock, and tf.io.gfile offers no atomic
"create if absent", so lease.json also carries a heartbeat time, refreshed by a daemon thread every TTL / 4
(TTL: 10 minutes unless told otherwise).
  * A lease whose heartbeat is younger than the TTL refuses every other acquirer. One whose holder ran on this
    machine (same host name, boot and pid namespace) and whose pid is gone is taken over at once; an older one is
    presumed dead and taken over; both with a warning naming the holder.
  * Two acquirers that both find the directory free both write their lease, wait a settle delay (3 s unless told
    otherwise), read the lease back, and only the one whose token is there goes on (gs:// reads are strongly
    consistent): the last writer wins and the other is refused, naming the winner. This holds as long as the gap
    between an acquirer's read and its write (one round trip to the store) is shorter than the settle delay.
    Should both ever pass, the loser's next heartbeat finds the winner's token.
  * A holder that finds another token in its lease (its heartbeat stalled past the TTL and another run took
    over, or the race above) marks the lease lost and stops refreshing it; `check()` then raises
    `LeaseLostError`: call it between steps and before writing, so that such a run stops before it writes again.
  * Limits: clocks of the hosts must agree to well within the TTL; a run killed on another machine blocks its
    workdir until its heartbeat is TTL old; a stall longer than the TTL lets another run in, which the stalled
    holder learns at its next heartbeat (TTL / 4 later at most, plus the stall).
  * Each write of the lease goes to `lease.<token>.tmp`, renamed over lease.json at once (so a reader never
    sees half a lease); a process killed in between leaves that small file behind.

Multi-process jobs: only JAX process 0 holds leases (`acquire_for_job`); it tells the other processes the outcome
through the coordination service, so that a refused job stops on every process together and none hangs.

A held lease is released at normal interpreter exit too (atexit), so a run that ends without `release()` does
not block a remote workdir for a TTL.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Iterable

from absl import logging

from semi_jax import files

LEASE_FILE = "lease.json"
DEFAULT_TTL_S = 600.0
DEFAULT_SETTLE_S = 3.0
WHAT_TO_DO = "wait for it to finish or stop it; to run a second experiment use another --workdir"
_COMMAND_CHARS = 120  # a command line longer than this is cut in messages
_HOLDER_WAIT_S = 1.0  # how long a refused local acquirer waits for a holder that is writing its lease file
_JOB_EXCHANGE = "workdir-lease"


def _local_time(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _shorten(argv: Iterable[str]) -> str:
  command = shlex.join(argv)
  return command if len(command) <= _COMMAND_CHARS else command[:_COMMAND_CHARS - 3] + "..."


def _age(seconds: float) -> str:
  seconds = max(seconds, 0.0)
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


def _machine_id() -> str | None:
  """This boot of this machine and this pid namespace: pids are compared only within it (hosts, e.g.
  containers, may share a host name)."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
      boot = f.read().strip()
    return f"{boot} {os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return None


def pid_alive(pid: int) -> bool:
  """Whether a process of this pid exists on this machine (another user's counts)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it exists
    return True
  return True


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lease, as its lease file says."""
  host: str
  pid: int
  started: float  # when it took the lease, in seconds since the epoch
  argv: tuple[str, ...]
  token: str  # random per lease: tells this lease from any later one, even of the same pid
  machine: str | None = None  # see _machine_id
  heartbeat: float | None = None  # remote leases: the last refresh, in seconds since the epoch

  def to_json(self) -> dict:
    obj = dataclasses.asdict(self)
    obj["argv"] = list(self.argv)
    obj["started_local"] = _local_time(self.started)  # for people reading the file
    return obj

  @classmethod
  def from_json(cls, obj) -> Holder | None:
    """The holder in a parsed lease file; None when it names none (an empty or foreign file)."""
    try:
      heartbeat = obj.get("heartbeat")
      return cls(host=str(obj["host"]), pid=int(obj["pid"]), started=float(obj["started"]),
                 argv=tuple(str(a) for a in obj.get("argv", ())), token=str(obj["token"]),
                 machine=obj.get("machine"), heartbeat=None if heartbeat is None else float(heartbeat))
    except (AttributeError, KeyError, TypeError, ValueError):
      return None

  @classmethod
  def parse(cls, text: str) -> Holder | None:
    try:
      return cls.from_json(json.loads(text))
    except ValueError:
      return None

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host}, started {_local_time(self.started)}, running {_shorten(self.argv)}"


class WorkdirBusyError(ValueError):
  """Another live run holds the lease of a directory. `directory` and `holder` (a Holder, or None when unknown)
  say which and whom."""

  def __init__(self, message: str, directory: str | None = None, holder: Holder | None = None):
    super().__init__(message)
    self.directory = directory
    self.holder = holder


class LeaseLostError(WorkdirBusyError):
  """Another run took over a lease this process held (remote file systems only): this run must stop."""


def _busy_message(directory: str, holder: Holder | None, detail: str = "") -> str:
  who = holder.describe() if holder is not None else "a process whose lease file names no holder yet"
  return f"{directory} is in use by another run ({who}{detail}); {WHAT_TO_DO}."


def _pread_all(fd: int) -> str:
  return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")


_HELD: set[Lease] = set()  # released at interpreter exit


class Lease:
  """An exclusive lease on `directory` (see the module docstring): `acquire()` (or `with Lease(d):`), `check()`
  now and then while writing, `release()`.

  The keyword arguments after `settle_s` stand in for the world in tests: the clock (seconds since the epoch),
  this host's name, this process's pid, whether a pid runs on this machine, and how to wait the settle delay.
  """

  def __init__(self, directory: str, *, ttl_s: float = DEFAULT_TTL_S, settle_s: float = DEFAULT_SETTLE_S,
               clock: Callable[[], float] = time.time, host: str | None = None, pid: int | None = None,
               pid_alive: Callable[[int], bool] = pid_alive, settle: Callable[[float], None] = time.sleep):
    if not ttl_s > 0:
      raise ValueError(f"ttl_s={ttl_s} must be positive: it is how old a remote lease's heartbeat may get.")
    if not settle_s >= 0:
      raise ValueError(f"settle_s={settle_s} must be 0 or more: it is how long to wait before reading a remote "
                       "lease back.")
    self.remote = files.is_remote(directory)
    self.directory = directory.rstrip("/") if self.remote else os.path.abspath(directory)
    self.path = files.join(self.directory, LEASE_FILE)
    self.ttl_s, self.settle_s = float(ttl_s), float(settle_s)
    self._clock, self._pid_alive, self._settle = clock, pid_alive, settle
    self._host = socket.gethostname() if host is None else host
    self._pid = os.getpid() if pid is None else pid
    self._machine = _machine_id()
    self._owner_pid = os.getpid()  # the process that must release it (not a forked child)
    self._holder: Holder | None = None
    self._fd: int | None = None
    self._pending = False  # remote: written, not yet read back
    self._takeover: str | None = None  # remote: the warning to log once the lease is confirmed
    self._lost = False
    self._lost_to: Holder | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __repr__(self) -> str:
    return f"Lease({self.directory!r}, held={self.held})"

  @property
  def held(self) -> bool:
    return self._holder is not None

  @property
  def holder(self) -> Holder | None:
    """This process's holder info (with the latest heartbeat) while it holds the lease, else None."""
    return self._holder

  def acquire(self) -> Lease:
    """Takes the lease; raises WorkdirBusyError when another live run holds it. Returns self."""
    self._start()
    if self._pending:
      try:
        self._settle(self.settle_s)
        self._confirm()
      except BaseException:
        self.release()
        raise
    return self

  def check(self) -> None:
    """Raises LeaseLostError when another run has taken the lease over (remote only; locally it cannot)."""
    if self._lost:
      who = self._lost_to.describe() if self._lost_to is not None else "no holder (the lease file was deleted)"
      raise LeaseLostError(
          f"{self.directory}: this run lost its lease on the directory: {self.path} now names {who}, presumably "
          f"because this run's heartbeat stalled for longer than the {_age(self.ttl_s)} TTL. Stop this run (both "
          f"would write the same files); restart it once the other has finished, or use another --workdir.",
          self.directory, self._lost_to)

  def release(self) -> None:
    """Gives the lease up; a lease not held is fine. Locally the file is emptied and unlocked (never deleted);
    remotely lease.json is deleted if it still holds this lease's token (a lease taken over stays)."""
    _HELD.discard(self)
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        os.ftruncate(fd, 0)
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
      finally:
        os.close(fd)
    if self.remote and self._holder is not None:
      self._stop.set()
      if self._thread is not None:
        self._thread.join()
        self._thread = None
      token = self._holder.token
      try:
        current, _ = self._read_remote()
        if current is not None and current.token == token:
          files.remove(self.path)
      except Exception as e:  # noqa: BLE001 (release runs in finally blocks: it must not hide the real error)
        logging.warning("Releasing the lease of %s failed (%s): the next run there waits until its heartbeat is "
                        "%s old; delete %s if no run uses the directory.", self.directory, e, _age(self.ttl_s),
                        self.path)
    self._holder = None
    self._pending = False

  def __enter__(self) -> Lease:
    return self if self.held else self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # The steps of acquire, separate so that acquire_all waits the settle delay once for all its remote leases.

  def _start(self) -> None:
    if self.held:
      raise RuntimeError(f"The lease of {self.directory} is already held by this Lease; release it first.")
    self._lost, self._lost_to, self._takeover = False, None, None
    self._stop = threading.Event()
    if self.remote:
      self._claim_remote()
    else:
      self._acquire_local()
    _HELD.add(self)

  def _new_holder(self) -> Holder:
    now = self._clock()
    return Holder(host=self._host, pid=self._pid, started=now, argv=tuple(sys.argv), token=uuid.uuid4().hex,
                  machine=self._machine, heartbeat=now if self.remote else None)

  def _same_machine(self, holder: Holder) -> bool:
    return holder.host == self._host and (holder.machine is None or self._machine is None
                                          or holder.machine == self._machine)

  # Local: flock.

  def _acquire_local(self) -> None:
    files.makedirs(self.directory)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      deadline = time.monotonic() + _HOLDER_WAIT_S
      while True:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          # Held. Its holder may be between locking and writing its info (or between emptying the file and
          # unlocking it on release): wait a moment for either.
          holder = Holder.parse(_pread_all(fd))
          if holder is not None or time.monotonic() > deadline:
            raise WorkdirBusyError(_busy_message(self.directory, holder), self.directory, holder) from None
          time.sleep(0.02)
        except OSError as e:
          raise OSError(f"Cannot lock {self.path} ({e}): its file system does not support flock; put the workdir "
                        "on a local disk, on NFS or on gs://.") from e
      previous = _pread_all(fd)
      holder = self._new_holder()
      data = (json.dumps(holder.to_json(), indent=1) + "\n").encode()
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)  # drops the lock if it was taken
      raise
    self._fd, self._holder = fd, holder
    if previous.strip():
      self._warn_local_takeover(previous)

  def _warn_local_takeover(self, previous_text: str) -> None:
    previous = Holder.parse(previous_text)
    if previous is None:
      logging.warning("Took over the lease of %s: its lock was free; its lease file named no readable holder (%r).",
                      self.directory, previous_text[:200])
    elif self._same_machine(previous) and not self._pid_alive(previous.pid):
      logging.warning("Took over the lease of %s from %s, which is no longer running.", self.directory,
                      previous.describe())
    else:
      logging.warning("Took over the lease of %s from %s: its lock was free, so that run has ended.",
                      self.directory, previous.describe())

  # Remote: heartbeat, settle delay, read-back.

  def _read_remote(self) -> tuple[Holder | None, str | None]:
    """(holder, text) of lease.json: (None, None) when there is none, (None, text) when it names no holder."""
    if not files.exists(self.path):
      return None, None
    try:
      text = files.read_text(self.path)
    except Exception:
      if not files.exists(self.path):  # released in between
        return None, None
      raise
    return Holder.parse(text), text

  def _write_remote(self, holder: Holder) -> None:
    # Per lease, so that two writers never share it; not "lease.json.<...>": ram:// would take that name's prefix
    # for a directory lease.json.
    tmp = files.join(self.directory, f"lease.{holder.token}.tmp")
    try:
      with files.open(tmp, "w") as f:
        f.write(json.dumps(holder.to_json(), indent=1) + "\n")
      files.rename(tmp, self.path, overwrite=True)
    except BaseException:
      try:
        files.remove(tmp)
      except Exception:  # noqa: BLE001 (the write's error is the one to report)
        pass
      raise

  def _claim_remote(self) -> None:
    self._look_remote()
    self._write_claim()

  def _look_remote(self) -> None:
    """Raises WorkdirBusyError while a live holder's lease is there; notes a takeover to warn about."""
    if not files.isdir(self.directory):
      files.makedirs(self.directory)
    current, text = self._read_remote()
    if current is not None:
      age = self._clock() - (current.started if current.heartbeat is None else current.heartbeat)
      if self._same_machine(current) and not self._pid_alive(current.pid):
        self._takeover = (f"Took over the lease of {self.directory} from {current.describe()}, which is no longer "
                          "running.")
      elif age < self.ttl_s:
        raise WorkdirBusyError(_busy_message(self.directory, current, f", last heartbeat {_age(age)} ago"),
                               self.directory, current)
      else:
        self._takeover = (f"Took over the lease of {self.directory} from {current.describe()}: its last heartbeat is "
                          f"{_age(age)} old, more than the {_age(self.ttl_s)} TTL, so that run is presumed dead.")
    elif text is not None:
      self._takeover = (f"Took over the lease of {self.directory}: {self.path} named no readable holder "
                        f"({text[:200]!r}).")

  def _write_claim(self) -> None:
    holder = self._new_holder()
    self._write_remote(holder)
    self._holder, self._pending = holder, True

  def _confirm(self) -> None:
    """After the settle delay: the lease is ours only if lease.json still holds our token."""
    current, _ = self._read_remote()
    if current is None or current.token != self._holder.token:
      self._holder, self._pending = None, False  # what is there is not ours: leave it alone
      _HELD.discard(self)
      if current is None:
        raise WorkdirBusyError(f"{self.path} vanished while this run took the lease of {self.directory}: another "
                               "process deleted it. Make sure no other run uses the directory, then start again.",
                               self.directory, None)
      raise WorkdirBusyError(_busy_message(self.directory, current, ", which took it at the same time"),
                             self.directory, current)
    self._pending = False
    if self._takeover:
      logging.warning("%s", self._takeover)
    self._thread = threading.Thread(target=self._heartbeat, name=f"lease-heartbeat {self.directory}", daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.ttl_s / 4):
      try:
        current, _ = self._read_remote()
        if current is None or current.token != self._holder.token:
          self._lost_to, self._lost = current, True
          logging.error("The lease of %s was taken over by %s; this run must stop.", self.directory,
                        current.describe() if current is not None else "nobody (lease.json was deleted)")
          return
        holder = dataclasses.replace(self._holder, heartbeat=self._clock())
        self._write_remote(holder)
        self._holder = holder
      except Exception as e:  # noqa: BLE001 (a network error: the next heartbeat tries again)
        logging.warning("Refreshing the lease of %s failed (%s); trying again in %s.", self.directory, e,
                        _age(self.ttl_s / 4))


class Leases:
  """Leases taken together (acquire_all): `check()` checks each, `release()` releases all. Empty on the processes
  of a job other than process 0, where both do nothing."""

  def __init__(self, leases: Iterable[Lease] = ()):
    self.leases = tuple(leases)

  @property
  def directories(self) -> list[str]:
    return [lease.directory for lease in self.leases]

  def __iter__(self):
    return iter(self.leases)

  def __len__(self) -> int:
    return len(self.leases)

  def check(self) -> None:
    for lease in self.leases:
      lease.check()

  def release(self) -> None:
    errors = []
    for lease in reversed(self.leases):
      try:
        lease.release()
      except Exception as e:  # noqa: BLE001 (release the rest first)
        errors.append(e)
    if errors:
      raise errors[0]

  def __enter__(self) -> Leases:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire_all(directories: Iterable[str], **lease_kwargs) -> Leases:
  """Leases on all `directories` (keyword arguments as Lease's), or none: on a refusal the leases already taken
  are released and the WorkdirBusyError is raised. Taken in sorted order, so that two sweeps over overlapping
  directories cannot each hold a part; remote ones wait their settle delay once, together."""
  by_path: dict[str, Lease] = {}
  for directory in directories:
    lease = Lease(directory, **lease_kwargs)
    by_path.setdefault(lease.directory, lease)
  leases = [by_path[d] for d in sorted(by_path)]
  taken: list[Lease] = []
  try:
    for lease in leases:
      lease._start()
      taken.append(lease)
    pending = [lease for lease in leases if lease._pending]
    if pending:
      pending[0]._settle(max(lease.settle_s for lease in pending))
      for lease in pending:
        lease._confirm()
  except BaseException:
    for lease in reversed(taken):
      try:
        lease.release()
      except Exception:  # noqa: BLE001 (the refusal is the error to report)
        logging.warning("Releasing the lease of %s failed", lease.directory, exc_info=True)
    raise
  return Leases(leases)


def acquire_for_job(directories: Iterable[str], **lease_kwargs) -> Leases:
  """acquire_all for every process of a multi-process JAX job: process 0 takes the leases and tells the others
  whether it could, and every process raises the same WorkdirBusyError if not (so all stop together). Returns
  the leases on process 0 and an empty Leases elsewhere. Every process must call it, at the same point."""
  import jax  # here, not at import: a module that only plans directories needs no JAX

  directories = list(directories)
  if jax.process_count() == 1:
    return acquire_all(directories, **lease_kwargs)
  from semi_jax import distributed
  if jax.process_index() != 0:
    outcome = distributed.agreed(_JOB_EXCHANGE, None)
    if outcome["ok"]:
      return Leases()
    if outcome["busy"]:
      holder = None if outcome.get("holder") is None else Holder.from_json(outcome["holder"])
      raise WorkdirBusyError(outcome["error"], outcome.get("directory"), holder)
    raise RuntimeError(f"Process 0 could not take the workdir leases ({outcome['error']}); see its log for the "
                       "cause and fix it there.")
  try:
    leases = acquire_all(directories, **lease_kwargs)
  except WorkdirBusyError as e:
    distributed.agreed(_JOB_EXCHANGE, {"ok": False, "busy": True, "error": str(e), "directory": e.directory,
                                       "holder": None if e.holder is None else e.holder.to_json()})
    raise
  except Exception as e:
    distributed.agreed(_JOB_EXCHANGE, {"ok": False, "busy": False, "error": f"{type(e).__name__}: {e}"})
    raise
  try:
    distributed.agreed(_JOB_EXCHANGE, {"ok": True})
  except BaseException:
    leases.release()
    raise
  return leases


@atexit.register
def _release_at_exit() -> None:
  for lease in list(_HELD):
    if lease._owner_pid == os.getpid():
      lease.release()
