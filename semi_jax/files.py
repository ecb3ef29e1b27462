"""Files of runs, sweeps and reports on a local disk or on a remote file system (gs://, TF's in-memory ram://).

The project's way to files outside checkpoints (which orbax writes): semi_jax.sweep and semi_jax.report read and
write through it, and it covers what semi_jax.train does with gfile (makedirs, exists, open, rename with
overwrite, appending a line to the eval log). A path with a scheme ("gs://...", "ram://...") is handled by
`tensorflow.io.gfile`, imported on first use; a local path by the standard library, so planning a sweep, printing
its commands and a local report never load TensorFlow. Paths stay plain strings and are joined with `join`
(os.path.join, which keeps "gs://bucket/dir" intact).

Writes of whole files are atomic where the file system allows: the data goes to `path + ".tmp"`, which is then
renamed over `path`, so a reader never sees half a file. (On gs:// an object appears whole anyway and the rename
is a copy; the same code serves every scheme.)
"""
from __future__ import annotations

import builtins
import json
import os


def _gfile():
  from tensorflow.io import gfile  # here, not at import: local use needs no TensorFlow (seconds to import)
  return gfile


def is_remote(path: str) -> bool:
  """True for a path with a scheme (gs://, ram://, ...), which gfile handles."""
  return "://" in path


join = os.path.join


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return (exists(path) and not isdir(path)) if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names in a directory, sorted. gfile lists a gs:// sub-directory as 'name/': the slash is dropped."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(name.rstrip("/") for name in _gfile().listdir(path))


def makedirs(path: str) -> None:
  """Creates a directory and its parents; an existing one is fine."""
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = "r"):
  """A file object: gfile.GFile for a remote path, else the builtin open (text in UTF-8)."""
  if is_remote(path):
    return _gfile().GFile(path, mode)
  if "b" in mode:
    return builtins.open(path, mode)
  # newline="" writes text as given, as GFile does ("\r\n" of a CSV stays "\r\n"); reading still splits lines.
  return builtins.open(path, mode, encoding="utf-8", newline="" if set(mode) & set("wax") else None)


def rename(src: str, dst: str, overwrite: bool = False) -> None:
  """Renames src to dst; an existing dst is an error unless overwrite (as gfile.rename)."""
  if is_remote(src) or is_remote(dst):
    _gfile().rename(src, dst, overwrite=overwrite)
    return
  if not overwrite and os.path.exists(dst):
    raise FileExistsError(f"{dst} exists; rename with overwrite=True to replace it.")
  os.replace(src, dst)


def read_text(path: str) -> str:
  with open(path) as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_json(path: str, default=None, strict: bool = True):
  """The JSON content of `path`, or `default` when it does not exist.

  Unparsable JSON raises ValueError naming the file; with strict=False it gives `default` too (a file cut short
  by a killed writer counts as absent). strict=False also treats a local file that cannot be read as absent;
  a read error of a remote file system still raises, so that a network failure never looks like a missing file.
  """
  if not exists(path):
    return default
  try:
    text = read_text(path)
  except OSError:
    if strict:
      raise
    return default
  try:
    return json.loads(text)
  except ValueError as e:
    if not strict:
      return default
    raise ValueError(f"{path} is not valid JSON ({e}); rewrite or delete it.") from None


def _write_atomic(path: str, data, mode: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, mode) as f:
    f.write(data)
  rename(tmp, path, overwrite=True)


def write_text_atomic(path: str, text: str) -> None:
  _write_atomic(path, text, "w")


def write_bytes_atomic(path: str, data: bytes) -> None:
  """E.g. a plot: matplotlib cannot write to gs://, so figures are saved to a buffer and written from there."""
  _write_atomic(path, data, "wb")


def write_json_atomic(path: str, obj, indent: int | None = 1, sort_keys: bool = False) -> None:
  write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def append_line(path: str, line: str) -> None:
  """Appends `line` to a text file (created if missing), ending it with a newline if it has none: e.g. one
  record of a JSON-lines log.

  Locally a real append. A gs:// object cannot be appended to (objects are immutable: TF's GCS file system
  emulates mode "a" by downloading and re-uploading the object, other file systems refuse it), so on a remote
  file system the file is read and rewritten atomically: one upload of the whole file per line, which is fine
  for logs written every few minutes.
  """
  line = line if line.endswith("\n") else line + "\n"
  if not is_remote(path):
    with open(path, "a") as f:
      f.write(line)
    return
  old = read_text(path) if exists(path) else ""
  write_text_atomic(path, old + line)


def remove(path: str) -> bool:
  """Deletes a file; False when there was none, which is fine: another process may have removed it first."""
  if not is_remote(path):
    try:
      os.remove(path)
    except FileNotFoundError:
      return False
    return True
  if not exists(path):
    return False
  try:
    _gfile().remove(path)
  except Exception:
    if exists(path):  # a real failure; a file removed in between by someone else is not
      raise
    return False
  return True
