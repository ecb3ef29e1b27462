"""semi_jax.files on a local disk and on TF's in-memory ram:// file system (which stands in for gs:// offline)."""
import ast
import json
import os

import pytest
import tensorflow as tf

from semi_jax import files, outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
  """An empty directory: under tmp_path, or a fresh ram:// one (conftest's ram_dir, removed afterwards)."""
  return str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("ram_dir")


def test_is_remote():
  assert files.is_remote("gs://bucket/sweep") and files.is_remote("ram://x")
  assert not files.is_remote("/tmp/sweep") and not files.is_remote("runs/sweep")
  assert files.join("gs://bucket/sweep", "ref", "seed_0") == "gs://bucket/sweep/ref/seed_0"


def test_directories(root):
  assert not files.exists(root) and not files.isdir(root)
  files.makedirs(files.join(root, "b", "seed_0"))
  files.makedirs(files.join(root, "b", "seed_0"))  # an existing directory is fine
  files.makedirs(files.join(root, "a"))
  files.write_text_atomic(files.join(root, "c.txt"), "c")
  assert files.listdir(root) == ["a", "b", "c.txt"]  # sorted, directories without a trailing slash
  assert files.isdir(files.join(root, "b")) and not files.isfile(files.join(root, "b"))
  assert files.isfile(files.join(root, "c.txt")) and not files.isdir(files.join(root, "c.txt"))
  assert not files.exists(files.join(root, "missing")) and not files.isfile(files.join(root, "missing"))


def test_listdir_drops_the_slash_gfile_gives_gs_directories(monkeypatch):
  monkeypatch.setattr(files._gfile(), "listdir", lambda path: ["seed_1/", "eval.jsonl", "seed_0/"])
  assert files.listdir("gs://bucket/sweep/ref") == ["eval.jsonl", "seed_0", "seed_1"]


def test_atomic_writes_replace_and_leave_no_temporary_file(root):
  files.makedirs(root)
  text, data = files.join(root, "report.md"), files.join(root, "plot.png")
  files.write_text_atomic(text, "old")
  files.write_text_atomic(text, "± Δ\r\nnew\n")  # UTF-8, line ends kept as given (a CSV's \r\n)
  files.write_bytes_atomic(data, b"\x89PNG\r\n\x1a\n")
  assert files.read_bytes(text) == "± Δ\r\nnew\n".encode()
  assert files.read_bytes(data) == b"\x89PNG\r\n\x1a\n"
  assert files.listdir(root) == ["plot.png", "report.md"]


def test_json(root):
  files.makedirs(root)
  path = files.join(root, "summary.json")
  assert files.read_json(path) is None and files.read_json(path, default={}) == {}
  files.write_json_atomic(path, {"step": 3, "acc": float("nan"), "b": [1, 2]}, sort_keys=True)
  back = files.read_json(path)
  assert back["step"] == 3 and back["b"] == [1, 2] and back["acc"] != back["acc"]
  assert files.read_text(path).startswith('{\n "acc": NaN')  # indent 1, sorted keys
  files.write_text_atomic(path, '{"step": 3, "acc"')  # a file cut short by a killed writer
  with pytest.raises(ValueError, match=r"summary.json is not valid JSON .*; rewrite or delete it"):
    files.read_json(path)
  assert files.read_json(path, default="absent", strict=False) == "absent"


def test_unreadable_local_json_is_absent_only_when_not_strict(tmp_path):
  files.makedirs(str(tmp_path / "summary.json"))  # a directory where a file is expected
  with pytest.raises(OSError):
    files.read_json(str(tmp_path / "summary.json"))
  assert files.read_json(str(tmp_path / "summary.json"), strict=False) is None


def test_append_line(root):
  files.makedirs(root)
  path = files.join(root, "eval.jsonl")
  files.append_line(path, json.dumps({"step": 1}))  # creates the file
  files.append_line(path, json.dumps({"step": 2}) + "\n")  # a newline is added only when missing
  assert files.read_text(path) == '{"step": 1}\n{"step": 2}\n'
  assert files.listdir(root) == ["eval.jsonl"]


def test_open_and_rename(root):
  files.makedirs(root)
  src, dst = files.join(root, "new.json"), files.join(root, "config.json")
  with files.open(src, "w") as f:
    f.write("new")
  files.write_text_atomic(dst, "old")
  with pytest.raises((FileExistsError, tf.errors.AlreadyExistsError)):  # local, gfile
    files.rename(src, dst)
  files.rename(src, dst, overwrite=True)
  with files.open(dst) as f:
    assert f.read() == "new"
  with files.open(dst, "rb") as f:
    assert f.read() == b"new"
  assert not files.exists(src)


def _file_calls(path: str) -> list[str]:
  """Builtin open and os file functions used in a module (semi_jax.files is the way to files)."""
  forbidden = {"os.listdir", "os.makedirs", "os.mkdir", "os.remove", "os.rename", "os.replace", "os.scandir",
               "os.walk", "os.path.exists", "os.path.isdir", "os.path.isfile", "io.open"}
  with open(path) as f:
    tree = ast.parse(f.read())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Name) and node.id == "open":
      found.append((node.lineno, "open"))
    elif isinstance(node, ast.Attribute):
      parts, inner = [node.attr], node.value
      while isinstance(inner, ast.Attribute):
        parts.append(inner.attr)
        inner = inner.value
      if isinstance(inner, ast.Name):
        name = ".".join([inner.id, *reversed(parts)])
        if name in forbidden or inner.id in ("shutil", "gfile"):
          found.append((node.lineno, name))
  return [f"{name} (line {line})" for line, name in sorted(found)]


@pytest.mark.parametrize("module", ["sweep.py", "report.py", "train.py"])
def test_runs_sweeps_and_reports_touch_files_only_through_semi_jax_files(module):
  assert _file_calls(os.path.join(ROOT, "semi_jax", module)) == []


def test_the_source_scan_finds_file_calls(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import os\nos.makedirs('d')\nwith open('f') as f: pass\nok = os.path.exists\nos.path.join('a')\n")
  assert _file_calls(str(path)) == ["os.makedirs (line 2)", "open (line 3)", "os.path.exists (line 4)"]


def test_run_bookkeeping_on_a_remote_file_system(root):
  """What a run writes besides checkpoints (orbax's): config.json, eval.jsonl (appended, then truncated on
  resume), summary.json, on the workdir's file system."""
  from configs import test as test_config
  from semi_jax import train
  config = test_config.get_config()
  workdir = files.join(root, "run")
  files.makedirs(workdir)
  train.check_workdir_config(config, workdir)
  train.write_workdir_config(config, workdir)
  assert files.read_json(files.join(workdir, train.CONFIG_FILE))["optim"]["lr"] == config.optim.lr
  config.optim.lr = 0.5
  with pytest.raises(ValueError, match="optim.lr: 0.03 -> 0.5"):
    train.check_workdir_config(config, workdir)
  log = files.join(workdir, outputs.EVAL_LOG)
  for step in (2, 4, 6):
    files.append_line(log, json.dumps({"step": step}))
  outputs.repair_eval_log(log, 4)
  assert [json.loads(line)["step"] for line in files.read_text(log).splitlines()] == [2, 4]
  assert sorted(files.listdir(workdir)) == [train.CONFIG_FILE, outputs.EVAL_LOG]  # no temporary file left
