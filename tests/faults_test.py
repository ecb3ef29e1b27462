"""Faults around the checkpoints: the logs, the workdir and the sweep survive them, and each ends in one line.

Each test is a row of the fault table this project was tried against: a log line cut short, two writers on one
workdir, a run that diverges in a sweep (alone and stacked), steps skipped as non-finite, a start that fails, a
disk that fills (injected through orbax's writer and the file layer, tests/fault_main.py), a read-only or
non-directory workdir, a missing config file, a log deleted mid-run, a divergence before any checkpoint.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from configs import test as test_config
from semi_jax import checkpointing, files, metrics, outputs, sweep, train
from semi_jax import train_step as steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_MAIN = os.path.join(ROOT, "tests", "fault_main.py")


def _env():
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             CUDA_VISIBLE_DEVICES="", JAX_THREEFRY_PARTITIONABLE="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=ROOT)
  return env


def _command(workdir, *flags, config="configs/test.py", fault=None):
  head = [sys.executable, FAULT_MAIN, fault] if fault else [sys.executable, "-m", "semi_jax.main"]
  return head + [f"--config={config}", f"--workdir={workdir}", *flags]


def _run(workdir, *flags, config="configs/test.py", fault=None, timeout=300):
  return subprocess.run(_command(workdir, *flags, config=config, fault=fault), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


def _one_line_error(result, *expected):
  """The run failed with one line on stderr naming what it should (no traceback on the terminal)."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  line = _last_line(result.stderr)
  for text in expected:
    assert text in line, line
  return line


def _checkpoints(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _evals(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, outputs.EVAL_LOG))]


# --- the eval log -------------------------------------------------------------------------------------------------


def test_a_log_line_cut_short_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, caplog):
  """The disk filled (or the run was killed) while an evaluation was appended: the next start drops the partial
  line, names the file and the byte offset, and resumes to the same log as an uninterrupted run."""
  config = test_config.get_config()
  done = str(tmp_path / "done")
  train.train_and_evaluate(config, done)
  cut = str(tmp_path / "cut")
  shutil.copytree(done, cut)
  # As if killed after the checkpoint of step 2, while the evaluation of step 3 was being appended.
  os.remove(os.path.join(cut, outputs.SUMMARY))
  shutil.rmtree(os.path.join(cut, "checkpoints", "3"))
  log = os.path.join(cut, outputs.EVAL_LOG)
  text = open(log).read()
  offset = text.rstrip("\n").rindex("\n") + 1  # the start of the last record
  open(log, "w").write(text[:offset] + text[offset:offset + 40])
  caplog.set_level(logging.WARNING)
  assert metrics.read_evals(log)[-1]["step"] == 2  # the report reads around it, with a warning
  summary = train.train_and_evaluate(config, cut)
  warnings = "\n".join(r.getMessage() for r in caplog.records)
  assert f"{log}: the last line (from byte {offset}" in warnings, warnings
  assert summary["step"] == 3 and summary["trained_steps"] == 1
  assert _evals(cut) == _evals(done)


def test_a_log_deleted_mid_run_is_reported_and_selection_says_what_it_saw(tmp_path, caplog, monkeypatch):
  config = test_config.get_config()
  config.train.total_steps, config.data.val_per_class = 6, 4
  real, calls = outputs.RunOutputs.write_eval, []

  def delete_before_the_third(self, step, result, bank):
    calls.append(step)
    if len(calls) == 3:
      os.remove(self.log_path)
    return real(self, step, result, bank)

  monkeypatch.setattr(outputs.RunOutputs, "write_eval", delete_before_the_third)
  caplog.set_level(logging.WARNING)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  warnings = "\n".join(r.getMessage() for r in caplog.records)
  assert "eval.jsonl was deleted while the run trained (it held 2 evaluations)" in warnings, warnings
  assert summary["selected_by_validation"]["evaluations"] == 1  # only the evaluation of step 6 is left


def test_a_log_shorter_than_the_checkpoint_is_reported_and_the_run_goes_on(tmp_path, caplog):
  config = test_config.get_config()
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, outputs.SUMMARY))
  os.remove(os.path.join(workdir, outputs.EVAL_LOG))
  config.train.total_steps = 5
  config.allow_config_change = True
  caplog.set_level(logging.WARNING)
  summary = train.train_and_evaluate(config, workdir)
  warnings = "\n".join(r.getMessage() for r in caplog.records)
  # Step 3 evaluated as the end of the 3-step run; the run now ends at 5, where only step 2 is an evaluation.
  assert "eval.jsonl is missing up to step 3 (missing: steps 2)" in warnings, warnings
  assert summary["step"] == 5 and [e["step"] for e in _evals(workdir)] == [4, 5]


# --- one writer per workdir -------------------------------------------------------------------------------------


def test_a_second_run_on_a_workdir_is_refused_and_touches_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  flags = ["--config.train.total_steps=40", "--config.train.checkpoint_every_steps=2"]
  first = subprocess.Popen(_command(workdir, *flags), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 300
    while not _checkpoints(workdir):
      assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
      time.sleep(0.2)
    first.send_signal(signal.SIGSTOP)  # the holder writes nothing while the second one tries
    before = {p: open(p, "rb").read() for p in _all_files(workdir)}
    second = _run(workdir, *flags)
    line = _one_line_error(second, f"{workdir} is in use", f"pid {first.pid}")
    assert "another --workdir" in line
    assert {p: open(p, "rb").read() for p in _all_files(workdir)} == before
  finally:
    first.send_signal(signal.SIGCONT)
  out, _ = first.communicate(timeout=300)
  assert first.returncode == 0, out[-3000:]
  assert [e["step"] for e in _evals(workdir)] == list(range(2, 41, 2))  # one run's records, once each


def _all_files(root):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_a_failing_tensorboard_writer_is_one_warning_and_training_goes_on(tmp_path, caplog, monkeypatch):
  """An error of clu's writer (its thread's error surfaces at the next call) is logged once, in one line; later
  writes are dropped instead of raising."""
  from clu import metric_writers

  class Broken:
    calls = 0

    def write_scalars(self, step, scalars):
      Broken.calls += 1
      raise OSError(28, "No space left on device")

    flush = close = lambda self: None

  monkeypatch.setattr(metric_writers, "create_default_writer", lambda *a, **k: Broken())
  caplog.set_level(logging.WARNING)
  events = outputs.Events(str(tmp_path), True, "run")
  events.write_scalars(1, {"a": 1.0})
  events.write_scalars(2, {"a": 2.0})
  events.flush()
  events.close()
  warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
  assert Broken.calls == 1 and len(warnings) == 1, warnings
  assert "No space left on device" in warnings[0] and str(tmp_path) in warnings[0] and "\n" not in warnings[0]


# --- a sweep survives a bad run -------------------------------------------------------------------------------------

DIVERGING = """
from configs import test
SEEDS = (0,)
def get_config(arg=None):
  return test.get_config("steps=4")
def get_sweep(arg=None):
  return [("a", {}), ("exploding", {"optim.lr": 1e6}), ("c", {"optim.lr": 0.01})]
"""


@pytest.mark.parametrize("together", [False, True], ids=["one_after_another", "together"])
def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path, together):
  spec = tmp_path / "diverging.py"
  spec.write_text(DIVERGING)
  workdir = str(tmp_path / "sweep")
  runs = sweep.plan(str(spec), workdir)
  lines = []
  results = (sweep.run_together(runs, workdir, log=lines.append) if together else
             sweep.run_sweep(runs, log=lines.append))
  assert [r["status"] for r in results] == ["trained", "diverged", "trained"]
  bad = files.read_json(os.path.join(runs[1].workdir, outputs.SUMMARY))
  assert bad["status"] == "diverged" and bad["step"] >= 1 and "loss" in bad["terms"], bad
  assert "diverged" in bad["message"] and bad["last_good_checkpoint"] is None or os.path.isdir(
      bad["last_good_checkpoint"])
  for r in (results[0], results[2]):
    summary = files.read_json(os.path.join(r["workdir"], outputs.SUMMARY))
    assert summary["status"] == "finished" and summary["step"] == 4
  # The command exits non-zero listing the failure; a rerun does not train it again unless asked.
  flags = type("Flags", (), dict(config=str(spec), workdir=workdir, seeds=None, only=None, print_commands=False,
                                 together=together, run_axis_size=-1, retry_failed=False))
  with pytest.raises(SystemExit, match="1 of 3 runs diverged: exploding seed 0"):
    sweep.main(["sweep"], flags)
  again = sweep.run_together(runs, workdir, log=lines.append) if together else sweep.run_sweep(runs, log=lines.append)
  assert [r["status"] for r in again] == ["skipped", "failed", "skipped"]
  assert any("--retry_failed trains it again" in line for line in lines)


# --- skipped steps ----------------------------------------------------------------------------------------------


def _poisoned_train_step(real, first_bad=2):
  """From step `first_bad` on, NaN in the loss and the parameters, as an overflowing update would give."""
  import jax.numpy as jnp

  def step(state, batch, rng, ctx):
    new_state, out = real(state, batch, rng, ctx)
    poison = jnp.where(state.step >= first_bad, jnp.nan, 0.0)
    out = dict(out, loss=out["loss"] + poison, loss_u=out["loss_u"] + poison)
    return new_state.replace(params=jax.tree.map(lambda p: p + poison, new_state.params)), out

  return step


def test_a_run_that_skips_most_steps_stops_as_diverged(tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "train_step", _poisoned_train_step(steps.train_step, first_bad=2))
  config = test_config.get_config()
  config.train.total_steps, config.train.log_every_steps = 8, 8
  config.train.skip_nonfinite_steps = True
  with pytest.raises(FloatingPointError, match=r"skipped \d+ steps with a non-finite loss or gradients, more than "
                                               r"0.5 of its last 100 steps"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  summary = files.read_json(os.path.join(str(tmp_path / "run"), outputs.SUMMARY))
  assert summary["status"] == "diverged" and summary["skipped_steps"] >= 3


def test_the_skipped_step_count_survives_a_resume(tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "train_step", _poisoned_train_step(steps.train_step, first_bad=2))
  config = test_config.get_config()
  config.train.total_steps, config.train.skip_nonfinite_steps, config.train.max_nonfinite_share = 4, True, 1.0
  workdir = str(tmp_path / "run")
  assert train.train_and_evaluate(config, workdir)["skipped_steps"] == 2
  config.train.total_steps, config.allow_config_change = 6, True
  summary = train.train_and_evaluate(config, workdir)
  assert summary["trained_steps"] == 2 and summary["skipped_steps"] == 4  # counted across the restart


def test_a_divergence_before_any_checkpoint_says_so(tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "train_step", _poisoned_train_step(steps.train_step, first_bad=0))
  config = test_config.get_config()
  config.train.checkpoint_every_steps = 100
  with pytest.raises(FloatingPointError, match="no checkpoint was written before it, so a rerun starts from step 0"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


# --- a failed start, and faults that end in one line --------------------------------------------------------------


def test_a_start_without_its_data_leaves_nothing_that_binds_the_next(tmp_path):
  workdir = str(tmp_path / "run")
  for config in ("configs/cifar10_lt.py", "configs/cifar10_lt.py:algo=acr"):
    result = _run(workdir, f"--config.data.data_dir={tmp_path}/tfds", config=config)
    _one_line_error(result, "semi_jax.tools.prepare_data --dataset=cifar10")  # not "a different config"
    assert not os.path.exists(os.path.join(workdir, train.CONFIG_FILE))
  result = _run(workdir, "--config.data.name=nope")
  _one_line_error(result, "unknown data set 'nope'")
  assert not os.path.exists(os.path.join(workdir, train.CONFIG_FILE))


def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_checkpoints(tmp_path):
  workdir = str(tmp_path / "run")
  result = _run(workdir, "--config.train.checkpoint_every_steps=1", fault="enospc_save")
  _one_line_error(result, "disk full (No space left on device) while writing", os.path.join(workdir, "checkpoints"))
  assert _checkpoints(workdir) == [1]
  config = test_config.get_config()
  summary = train.train_and_evaluate(config, workdir)  # the same command, with space again, resumes
  assert summary["trained_steps"] == 2


def test_a_full_disk_while_logging_ends_in_one_line_and_the_rerun_resumes(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  flags = ["--config.train.total_steps=6", "--config.train.checkpoint_every_steps=2"]
  result = _run(workdir, *flags, fault="enospc_log")
  _one_line_error(result, "disk full", os.path.join(workdir, outputs.EVAL_LOG))
  assert _checkpoints(workdir) == [2]  # the save in flight when the log failed was finished, not lost
  caplog.set_level(logging.WARNING)
  rerun = _run(workdir, *flags)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "was cut short" in rerun.stderr
  assert [e["step"] for e in _evals(workdir)] == [2, 4, 6]


@pytest.mark.parametrize("case", ["readonly", "file", "missing_config"])
def test_an_unusable_workdir_or_config_ends_in_one_line(tmp_path, case):
  workdir = str(tmp_path / "run")
  if case == "readonly":
    _one_line_error(_run(workdir, fault="readonly"), f"cannot write {workdir} (Read-only file system)")
  elif case == "file":
    open(workdir, "w").close()
    _one_line_error(_run(workdir), f"--workdir {workdir} is a file, not a directory")
  else:
    _one_line_error(_run(workdir, config="configs/nope.py"), "config file 'configs/nope.py' does not exist")


# --- a checkpoint is moved aside only when it is provably damaged -------------------------------------------------


def test_a_checkpoint_of_another_bank_size_is_refused_and_nothing_moves(tmp_path):
  config = test_config.get_config()
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, outputs.SUMMARY))
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config.bank.size, config.allow_config_change = 8, True
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert "semi/bank" in message and "bank.size" in message and "bank.size: 4 -> 8" in message, message
  assert "Nothing was moved" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_an_unknown_read_error_stops_and_moves_nothing(tmp_path, monkeypatch):
  config = test_config.get_config()
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, outputs.SUMMARY))
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))

  def odd(self, step, template):
    raise RuntimeError("INTERNAL: the store said something new")

  monkeypatch.setattr(checkpointing.Checkpointer, "_restore_verified", odd)
  with pytest.raises(checkpointing.CheckpointReadError, match="nothing was moved"):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
