"""How the commands report a failure: one line naming the cause and the path, the full traceback in a log file.

A run that stops on a fault (a disk that filled, a workdir it cannot write, a missing config file, a divergence,
a checkpoint it cannot read) ends with exit status 1 and one line that says what happened, where, and what to do
(`describe`). Everything else (the traceback, and the tracebacks that orbax, clu and asyncio print from their
threads as they fail along) goes to a log file (`capture`), whose path the line gives.
"""
from __future__ import annotations

import errno
import logging as std_logging
import os
import re
import sys
import tempfile
import time
import traceback

from absl import logging

# Messages of libraries' own threads that a failed write leaves behind; they say nothing the line does not.
_LIBRARY_PATHS = (os.sep + "orbax" + os.sep, os.sep + "clu" + os.sep, os.sep + "tensorflow" + os.sep,
                  os.sep + "asyncio" + os.sep)
_log: list = []  # [path, file handler, terminal stream] of `capture`


def error_chain(error: BaseException):
  """`error` and its causes and contexts, each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _os_error(error: BaseException):
  """The first OSError with an errno in the cause chain (or a message that carries one), else None."""
  for e in error_chain(error):
    if isinstance(e, OSError) and e.errno is not None:
      return e
    text = str(e)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EDQUOT):
      if os.strerror(code) in text:
        return OSError(code, os.strerror(code), None)
  return None


def describe(error: BaseException, workdir: str | None = None) -> str:
  """One line for a fault: its cause, the path involved and what to do."""
  return re.sub(r"\s*\n\s*", " ", _describe(error, workdir))


def _describe(error: BaseException, workdir: str | None) -> str:
  from semi_jax import checkpointing, config_validation, workdir as workdir_lib
  os_error = _os_error(error)
  if os_error is not None and not isinstance(error, (config_validation.ConfigError, workdir_lib.WorkdirBusyError)):
    path = os_error.filename or workdir or "the workdir"
    code = os_error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
      return (f"disk full ({os.strerror(code)}) while writing {path}. Free space there (or raise the quota) and "
              "rerun the same command: it resumes from the last checkpoint, which is intact.")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
      return (f"cannot write {path} ({os.strerror(code)}): --workdir must be a directory this process may write; "
              "choose another --workdir or fix its permissions.")
    if code in (errno.ENOTDIR, errno.EEXIST) and workdir is not None and os.path.isfile(workdir):
      return f"--workdir {workdir} is a file, not a directory: choose a directory (it is created if missing)."
    if code == errno.ENOTDIR:
      return f"{path} is not a directory ({os.strerror(code)}): --workdir must be a directory path."
  if isinstance(error, config_validation.ConfigError):
    return f"bad configuration: {error}"
  if isinstance(error, FloatingPointError):
    return f"diverged: {error}"
  if isinstance(error, (ValueError, checkpointing.CheckpointIOError, checkpointing.CheckpointReadError)):
    return f"{type(error).__name__}: {error}"
  return f"unexpected {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class _Quiet(std_logging.Filter):
  """Keeps off the terminal what libraries log with a traceback (orbax's and clu's threads as they fail along
  with a write): the log file has it, and the command's last line says what happened."""

  def filter(self, record):
    return not (record.exc_info and any(p in (record.pathname or "") for p in _LIBRARY_PATHS))


class _QuietFileHandler(std_logging.FileHandler):
  """A log file that never complains on the terminal when it cannot be written (e.g. a full disk)."""

  def handleError(self, record):
    pass


def capture(program: str) -> str:
  """Makes the log file of this process: the whole log, tracebacks included, and everything written to stderr
  by other means (Python's and the libraries' C++ threads print their tracebacks there as a failed save unwinds).
  The terminal keeps the log lines, without the libraries' tracebacks, and the command's own messages. Returns
  the file's path ("" where no file could be made: then nothing changes). For the commands' entry points only:
  it takes over the process's stderr."""
  directory = os.path.join(tempfile.gettempdir(), "semi_jax-logs")
  try:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{program}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  except OSError:
    return ""
  sys.stderr.flush()
  terminal = os.fdopen(os.dup(2), "w", buffering=1)  # the terminal, for the log lines and the last line
  os.dup2(fd, 2)  # everything else written to stderr: into the file
  os.close(fd)
  absl_handler = logging.get_absl_handler()
  absl_handler.python_handler.setStream(terminal)
  absl_handler.addFilter(_Quiet())
  handler = _QuietFileHandler(path)
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(pathname)s:%(lineno)d] %(message)s"))
  std_logging.getLogger().addHandler(handler)
  _log[:] = [path, handler, terminal]
  logging.info("Full log, with every traceback: %s", path)
  return path


def exit_with(error: BaseException, program: str, workdir: str | None = None):
  """Writes the traceback to the log file of `capture`, prints the line of `describe` on the terminal and exits
  with status 1."""
  where, terminal = "", sys.stderr
  if _log:
    path, handler, terminal = _log
    handler.emit(std_logging.LogRecord(program, std_logging.ERROR, "", 0, "%s stopped:\n%s",
                                       (program, "".join(traceback.format_exception(error))), None))
    handler.flush()
    where = f" (details: {path})"
  print(f"{program}: {describe(error, workdir)}{where}", file=terminal, flush=True)
  sys.exit(1)


def fail(line: str):
  """Exits with status 1 and `line` on the terminal (also after `capture` took stderr over)."""
  if not _log:
    sys.exit(line)
  print(line, file=_log[2], flush=True)
  sys.exit(1)
