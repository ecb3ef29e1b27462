"""The commands a newcomer types first: --help of semi_jax.main and semi_jax.sweep, and a sweep's --config.*
overrides (applied to every variant, recorded, and refused where a variant sets the field)."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from semi_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = os.path.join(ROOT, "configs", "ablations", "decay.py")


def _command(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("program, expected", [
    ("semi_jax.main", ["digits_lt.py", "cifar10_lt.py", "algo=", "steps=", "--config.train.total_steps",
                       "docs/config.md", "--workdir"]),
    ("semi_jax.sweep", ["decay.py", "components.py", "base=", "--together", "--retry_failed",
                        "--config.FIELD=VALUE", "docs/config.md"]),
])
def test_help_lists_the_configs_arguments_and_fields_and_exits_0(program, expected):
  result = _command(program, "--help")
  assert result.returncode == 0, result.stderr[-3000:]
  for text in expected:
    assert text in result.stdout, (text, result.stdout)


def test_sweep_overrides_reach_every_variant_and_are_recorded(tmp_path):
  workdir = str(tmp_path / "sweep")
  runs = sweep.plan(f"{DECAY}:base=test", workdir, seeds=[0, 1],
                    common={"train": {"total_steps": 7}, "model.dtype": "bfloat16"})
  assert len(runs) > 2
  for run in runs:
    assert run.config.train.total_steps == 7 and run.config.model.dtype == "bfloat16", run.variant
    record = sweep.variant_record(run)
    assert record["common_overrides"] == {"train.total_steps": 7, "model.dtype": "bfloat16"}
    assert record["config"]["train"]["total_steps"] == 7
  # A variant's own override still wins over the base's value, and the launch command carries both.
  no_decay = next(r for r in runs if r.variant == "no_decay")
  assert no_decay.config.bank.beta.value == 1.0
  command = shlex.split(sweep.launch_command(no_decay))
  assert "--config.train.total_steps=7" in command and "--config.model.dtype=bfloat16" in command
  assert "--config.bank.beta.value=1.0" in command


def test_the_sweep_command_takes_overrides_and_refuses_a_collision(tmp_path):
  workdir = str(tmp_path / "sweep")
  result = _command("semi_jax.sweep", f"--config={DECAY}:base=test", f"--workdir={workdir}", "--seeds=0",
                    "--only=reference,no_decay", "--print_commands", "--config.train.total_steps=9")
  assert result.returncode == 0, result.stderr[-3000:]
  commands = [shlex.split(line) for line in result.stdout.splitlines() if "semi_jax.main" in line]
  assert len(commands) == 2 and all("--config.train.total_steps=9" in c for c in commands), result.stdout
  record = json.load(open(os.path.join(workdir, "no_decay", "seed_0", "sweep_variant.json")))
  assert record["common_overrides"] == {"train.total_steps": 9} and record["config"]["train"]["total_steps"] == 9

  clash = _command("semi_jax.sweep", f"--config={DECAY}:base=test", f"--workdir={tmp_path / 'other'}",
                   "--print_commands", "--config.bank.beta.value=0.9")
  assert clash.returncode == 1 and "Traceback" not in clash.stderr, clash.stderr[-3000:]
  line = clash.stderr.strip().splitlines()[-1]
  assert "--config.bank.beta.value collides with sweep variant" in line and "--only" in line, line
  assert not os.path.exists(tmp_path / "other")
