"""`python -m semi_jax.main` with a fault injected into this process: into its checkpoint reads (multi-process
tests), or into its writes, through the file layer (semi_jax.files) and orbax's writer (epath), as a full or
read-only disk would make them fail.

python tests/fault_main.py KIND --config=... --workdir=...   where KIND is
  transient    the first read of every checkpoint raises an I/O error (a storage hiccup: retried, then read);
  io           every read raises an I/O error (storage unreachable from this host);
  content      the newest checkpoint's content does not match its fingerprint, on this process only;
  enospc_save  the disk is full from the second checkpoint's save on (orbax's writes fail with ENOSPC);
  enospc_log   the disk fills while the second evaluation is appended to eval.jsonl: half the line is written;
               checkpoint writes are slowed by a second, so that the previous save is still in flight;
  readonly     the workdir's file system is read-only (EROFS).
Retries wait 0.2 s instead of seconds.
"""
import errno
import functools
import os
import sys

from absl import app

from semi_jax import checkpointing, config_files, main

KIND = sys.argv.pop(1)
_real_read = checkpointing.Checkpointer._restore_verified
_real_init = checkpointing.Checkpointer.__init__
_attempts = {}
_newest = []  # the newest step at the first read: the one whose content is "damaged"


def _faulty_read(self, step, template):
  _attempts[step] = _attempts.get(step, 0) + 1
  if KIND == "io" or (KIND == "transient" and _attempts[step] == 1):
    raise ConnectionResetError(f"injected: connection reset while reading {self.path(step)}")
  _newest.append(_newest[0] if _newest else max(self.all_steps()))
  if KIND == "content" and step == _newest[0]:
    raise checkpointing.CheckpointContentError("injected: content fingerprint mismatch in 1 of 42 arrays")
  return _real_read(self, step, template)


def _error(code: int, path: str) -> OSError:
  return OSError(code, os.strerror(code), path)


if KIND in ("transient", "io", "content"):
  checkpointing.Checkpointer._restore_verified = _faulty_read
  checkpointing.Checkpointer.__init__ = functools.partialmethod(_real_init, retry_delay_s=0.2)

if KIND == "enospc_save":
  from etils import epath
  saves = []

  def _full_from_the_second_save(write):
    def wrapped(self, data, *args, **kwargs):
      step = next((part.split(".")[0] for part in str(self).split(os.sep) if part.split(".")[0].isdigit()), None)
      if "checkpoints" in str(self) and step is not None:
        saves.append(step) if step not in saves else None
        if saves.index(step) >= 1:
          raise _error(errno.ENOSPC, str(self))
      return write(self, data, *args, **kwargs)
    return wrapped

  epath.Path.write_bytes = _full_from_the_second_save(epath.Path.write_bytes)
  epath.Path.write_text = _full_from_the_second_save(epath.Path.write_text)

if KIND == "enospc_log":
  from semi_jax import files
  _real_append, _appended = files.append_line, []

  def _append_until_full(path, line):
    if path.endswith("eval.jsonl"):
      _appended.append(line)
      if len(_appended) == 2:
        with open(path, "a") as f:
          f.write(line[:len(line) // 2])
        raise _error(errno.ENOSPC, path)
    return _real_append(path, line)

  files.append_line = _append_until_full

  import time

  from etils import epath

  def _slow(write):
    def wrapped(self, *args, **kwargs):
      if "checkpoints" in str(self):
        time.sleep(1.0)
      return write(self, *args, **kwargs)
    return wrapped

  epath.Path.write_bytes = _slow(epath.Path.write_bytes)
  epath.Path.write_text = _slow(epath.Path.write_text)

if KIND == "readonly":
  from semi_jax import files
  _real_makedirs = files.makedirs

  def _read_only(path):
    raise _error(errno.EROFS, path)

  files.makedirs = _read_only

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main.main, flags_parser=lambda argv: config_files.parse_flags(main.FLAGS, argv, "semi_jax"))
