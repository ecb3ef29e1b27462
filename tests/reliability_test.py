"""Faults injected into real runs: SIGKILL and SIGTERM mid-run, damaged checkpoints, NaN steps, a changed config.

The subprocess runs use the same 8 fake CPU devices and compile cache as the in-process tests, so a resumed
run must reproduce an uninterrupted one bit for bit.
"""
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from semi_jax import checkpointing, config_validation, outputs, train
from semi_jax import train_step as steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
RUN_FLAGS = [f"--config.train.total_steps={STEPS}", "--config.train.checkpoint_every_steps=1",
             "--config.train.eval_every_steps=2", "--config.train.keep_checkpoints=10"]


def _child_env():
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
      CUDA_VISIBLE_DEVICES="", JAX_THREEFRY_PARTITIONABLE="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      PYTHONPATH=ROOT)
  return env


def _start(workdir, *extra, stdout=subprocess.PIPE):
  # Started outside the repository, with the config given by path: the entry point works from any directory.
  cmd = [sys.executable, "-m", "semi_jax.main", f"--config={os.path.join(ROOT, 'configs', 'test.py')}",
         f"--workdir={workdir}", *RUN_FLAGS, *extra]
  return subprocess.Popen(cmd, cwd=os.path.dirname(workdir), env=_child_env(), stdout=stdout,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout and proc.poll() is None:
    if any(s >= step for s in _steps(workdir)):
      return
    time.sleep(0.01)
  raise AssertionError(f"no checkpoint of step >= {step} appeared (exit code {proc.poll()})")


def _final(workdir, template):
  """Everything a run leaves that must not depend on interruptions: final state, eval log, summary."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 10)
  state = jax.device_get(ckpt.restore(template)[1])
  ckpt.close()
  evals = [json.loads(line) for line in open(os.path.join(workdir, outputs.EVAL_LOG))]
  summary = json.load(open(os.path.join(workdir, outputs.SUMMARY)))
  for k in ("train_seconds", "trained_steps"):
    summary.pop(k)
  return state, evals, summary


def _assert_same_run(a, b):
  (sa, ea, ma), (sb, eb, mb) = a, b
  assert int(sa.step) == int(sb.step) == STEPS
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  assert ea == eb
  assert ma == mb


@pytest.fixture(scope="module")
def template(tmp_path_factory):
  config = test_config.get_config()
  config.train.total_steps = STEPS
  return train.Trainer(config, str(tmp_path_factory.mktemp("template"))).state


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, template):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  code, out = _finish(_start(workdir))
  assert code == 0, out
  return _final(workdir, template)


def test_sigkill_at_a_random_step_then_resume_is_bitwise_equal(tmp_path, reference_run, template):
  workdir = str(tmp_path / "killed")
  kill_after = random.Random(STEPS).randint(1, STEPS // 2)  # seeded: a failure reproduces
  proc = _start(workdir)
  _wait_for_checkpoint(proc, workdir, kill_after)
  proc.send_signal(signal.SIGKILL)
  code, out = _finish(proc)
  assert code == -signal.SIGKILL, f"the run ended before it could be killed (kill after step {kill_after})"
  killed_at = _steps(workdir)
  assert killed_at and killed_at[-1] < STEPS, killed_at
  code, out = _finish(_start(workdir))
  assert code == 0, out
  started = [int(m) for m in re.findall(r"Training from step (\d+) ", out)]
  assert len(started) == 1 and started[0] in killed_at, (started, killed_at)
  _assert_same_run(_final(workdir, template), reference_run)


def test_sigterm_saves_exits_zero_and_resumes_bitwise_equal(tmp_path, reference_run, template):
  """The signal arrives as soon as the run says it is training, i.e. during the first (compiling) step: the run
  must stop early with a preemption checkpoint, never degenerate into an uninterrupted run."""
  workdir = str(tmp_path / "preempted")
  log_path = tmp_path / "preempted.log"
  with open(log_path, "w") as log:
    proc = _start(workdir, stdout=log)
    t0 = time.time()
    while "Training from step 0 " not in log_path.read_text():
      assert proc.poll() is None and time.time() - t0 < 300, log_path.read_text()[-3000:]
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
  out = log_path.read_text()
  saved = _steps(workdir)
  assert "Received signal 15" in out and saved and saved[-1] < STEPS, (saved, out[-3000:])
  assert not os.path.exists(os.path.join(workdir, outputs.SUMMARY))
  code, out = _finish(_start(workdir))
  assert code == 0, out
  assert re.findall(r"Training from step (\d+) ", out) == [str(saved[-1])]
  _assert_same_run(_final(workdir, template), reference_run)


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def test_damaged_checkpoints_are_moved_aside_and_the_run_falls_back(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  config = test_config.get_config()
  config.train.checkpoint_every_steps = 1
  first = train.train_and_evaluate(config, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  assert _steps(workdir) == [1, 2, 3]
  # Step 3: a file cut off mid-write. Step 2: garbled bytes in the middle of its largest file.
  path = _largest_file(os.path.join(ckpts, "3"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  path = _largest_file(os.path.join(ckpts, "2"))
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(random.Random(0).randrange(256) for _ in range(64)))
  # A save that was killed before its rename: a temporary directory, never mistaken for a checkpoint.
  os.makedirs(os.path.join(ckpts, "4.orbax-checkpoint-tmp-1234567"))
  caplog.set_level(logging.WARNING)
  again = train.train_and_evaluate(config, workdir)
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert os.path.join(ckpts, "3") + " is unreadable" in warnings, warnings
  assert os.path.join(ckpts, "2") + " is unreadable" in warnings, warnings
  moved = sorted(n for n in os.listdir(ckpts) if n.startswith("corrupt-"))
  assert [n.split("-")[1] for n in moved] == ["2", "3"], moved
  assert not any("tmp" in n for n in os.listdir(ckpts))
  assert again["trained_steps"] == 2 and again["step"] == 3  # resumed from the good step 1
  assert _steps(workdir) == [1, 2, 3]
  for k in ("acc", "balanced_acc", "per_class", "acc_standard_head", "acc_balanced_head"):
    assert again[k] == first[k], k


def _poisoned_train_step(real):
  """From the third step on, NaN in the loss and the parameters, as an overflowing update would give."""

  def step(state, batch, rng, ctx):
    new_state, out = real(state, batch, rng, ctx)
    poison = jnp.where(state.step >= 2, jnp.nan, 0.0)
    out = dict(out, loss=out["loss"] + poison, loss_u=out["loss_u"] + poison)
    return new_state.replace(params=jax.tree.map(lambda p: p + poison, new_state.params)), out

  return step


def test_nonfinite_step_stops_the_run_and_keeps_a_good_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "train_step", _poisoned_train_step(steps.train_step))
  workdir = str(tmp_path / "run")
  config = test_config.get_config()
  config.train.total_steps = 4
  config.train.checkpoint_every_steps = 1
  config.train.log_every_steps = 2  # the guard also runs before every save, not only at log steps
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients at step 3: .*loss_u=nan.*"
                                               r"last good checkpoint \(step 2\)"):
    train.train_and_evaluate(config, workdir)
  assert _steps(workdir) == [1, 2]
  trainer = train.Trainer(config, workdir)
  assert trainer.restore() == 2
  trainer.leases.release()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(trainer.state)))


def test_skip_nonfinite_steps_keeps_the_old_state(tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "train_step", _poisoned_train_step(steps.train_step))
  config = test_config.get_config()
  config.train.total_steps = 4
  config.train.skip_nonfinite_steps = True
  trainer = train.Trainer(config, str(tmp_path / "run"))
  summary = trainer.run()
  assert summary["step"] == 4 and summary["skipped_steps"] == 2 and summary["status"] == "finished"
  ckpt = checkpointing.Checkpointer(os.path.join(str(tmp_path / "run"), "checkpoints"), 3)
  (_, after2), (_, after4) = (jax.device_get(ckpt.restore(trainer.state, step=s)) for s in (2, 4))
  ckpt.close()
  assert int(after4.step) == 4
  # The skipped steps are counted in the checkpointed state; the optimiser's step count advances with the run's.
  assert int(after4.guard.skipped) == 2 and int(after4.guard.first_bad_step) == 3
  assert [int(x) for x in jax.tree.leaves(after4.opt_state) if np.issubdtype(np.asarray(x).dtype, np.integer)] == [4]
  kept = lambda s: s.replace(step=0, guard=None, opt_state=[x for x in jax.tree.leaves(s.opt_state)
                                                            if np.issubdtype(np.asarray(x).dtype, np.floating)])
  for a, b in zip(jax.tree.leaves(kept(after2)), jax.tree.leaves(kept(after4))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _claim(config, workdir):
  """What a start does with the workdir's config.json: checks it, and (once the run can start) writes it."""
  train.check_workdir_config(config, workdir)
  train.write_workdir_config(config, workdir)


def test_changed_config_is_refused_with_a_diff_unless_allowed(tmp_path):
  workdir = str(tmp_path)
  config = test_config.get_config()
  _claim(config, workdir)
  saved = json.load(open(os.path.join(workdir, train.CONFIG_FILE)))
  assert saved["optim"]["lr"] == config.optim.lr
  # Resume-safe fields change freely.
  config.train.log_every_steps = 7
  config.data.data_dir = "/elsewhere"
  _claim(config, workdir)
  # Anything else is refused, naming every differing field with both values.
  config.optim.lr = 0.05
  config.ssl.threshold.value = 0.5
  with pytest.raises(config_validation.ConfigError) as err:
    train.check_workdir_config(config, workdir)
  message = str(err.value)
  assert "optim.lr: 0.03 -> 0.05" in message and "ssl.threshold.value: 0.12 -> 0.5" in message, message
  assert "allow_config_change" in message and "total_steps" not in message
  # total_steps shapes the lr cosine and the ramps: a longer run is another experiment, allowed only explicitly.
  config.optim.lr, config.ssl.threshold.value = 0.03, 0.12
  config.train.total_steps = 5
  with pytest.raises(config_validation.ConfigError, match=r"train.total_steps: 3 -> 5"):
    train.check_workdir_config(config, workdir)
  config.train.total_steps, config.optim.lr, config.ssl.threshold.value = 3, 0.05, 0.5
  config.allow_config_change = True
  _claim(config, workdir)
  assert json.load(open(os.path.join(workdir, train.CONFIG_FILE)))["optim"]["lr"] == 0.05


def test_a_workdir_older_than_a_new_field_resumes_while_the_field_keeps_its_default(tmp_path):
  workdir = str(tmp_path)
  config = test_config.get_config()
  _claim(config, workdir)
  path = os.path.join(workdir, train.CONFIG_FILE)
  saved = json.load(open(path))
  del saved["bank"]["dtype"], saved["data"]["augment_on"]  # as written before these fields existed
  json.dump(saved, open(path, "w"))
  _claim(config, workdir)  # at their defaults: the same run
  saved = json.load(open(path))
  del saved["bank"]["dtype"]
  json.dump(saved, open(path, "w"))
  config.bank.dtype = "bfloat16"  # not the default: a change the user must allow
  with pytest.raises(config_validation.ConfigError, match=r"bank.dtype: '<absent>' -> 'bfloat16'"):
    train.check_workdir_config(config, workdir)
