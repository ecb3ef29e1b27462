"""Sweep runner: override handling, planning errors before training, launch commands, skip / resume, report.

One real sweep (2 variants x 1 seed of configs/test.py, 3 steps each) is shared by the tests that need
trained runs; everything else plans only.
"""
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import types

from absl import flags
from ml_collections import config_flags
import pytest

from configs import default
from configs import test as test_config
from configs.ablations import components
from semi_jax import files, outputs, report, sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = os.path.join(ROOT, "configs", "ablations", "decay.py")
COMPONENTS = os.path.join(ROOT, "configs", "ablations", "components.py")
TRAINED = ["reference", "beta_anneal"]  # a plain variant and one whose override is a whole schedule dict
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _counting_train(monkeypatch, calls, allow=True):
  real = train.train_and_evaluate

  def counted(config, workdir):
    calls.append(workdir)
    if not allow:
      raise AssertionError(f"unexpected training in {workdir}")
    return real(config, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", counted)


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  runs = sweep.plan(f"{DECAY}:base=test", workdir, seeds=[0], only=TRAINED)
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    _counting_train(mp, calls)
    results = sweep.run_sweep(runs, log=lambda line: None)
  return workdir, runs, results, calls


def _mtimes(workdir):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(workdir) for f in files}


# --- runs that train ----------------------------------------------------------------------------------------


def test_sweep_trains_each_variant_in_its_own_workdir(trained_sweep):
  workdir, runs, results, calls = trained_sweep
  expected_dirs = [os.path.join(workdir, v, "seed_0") for v in TRAINED]
  assert calls == expected_dirs
  assert [r["status"] for r in results] == ["trained", "trained"]
  for run, result in zip(runs, results):
    summary = json.load(open(os.path.join(run.workdir, sweep.SUMMARY)))
    assert summary["step"] == summary["trained_steps"] == 3 == result["summary"]["step"]
    meta = json.load(open(os.path.join(run.workdir, sweep.VARIANT_FILE)))
    assert (meta["name"], meta["seed"], meta["overrides"]) == (run.variant, 0, run.overrides)
    assert meta["config"]["seed"] == 0 and meta["config"]["train"]["total_steps"] == 3
  anneal = json.load(open(os.path.join(expected_dirs[1], sweep.VARIANT_FILE)))["config"]["bank"]["beta"]
  assert (anneal["kind"], anneal["value"], anneal["end_value"]) == ("linear", 0.95, 0.999)


def test_second_invocation_trains_nothing(trained_sweep, monkeypatch):
  workdir, runs, _, _ = trained_sweep
  before = _mtimes(workdir)
  calls = []
  _counting_train(monkeypatch, calls, allow=False)
  again = sweep.run_sweep(sweep.plan(f"{DECAY}:base=test", workdir, seeds=[0], only=TRAINED), log=lambda s: None)
  assert calls == [] and [r["status"] for r in again] == ["skipped", "skipped"]
  assert [r["summary"]["step"] for r in again] == [3, 3]
  assert _mtimes(workdir) == before


def test_interrupted_run_resumes_from_its_checkpoint(trained_sweep, tmp_path, monkeypatch):
  workdir, _, _, _ = trained_sweep
  copy = str(tmp_path / "sweep")
  shutil.copytree(workdir, copy)
  # Simulate a run killed after its step-2 checkpoint: no step-3 checkpoint, evaluation or summary.
  broken = os.path.join(copy, "reference", "seed_0")
  shutil.rmtree(os.path.join(broken, "checkpoints", "3"))
  os.remove(os.path.join(broken, sweep.SUMMARY))
  log = os.path.join(broken, report.EVAL_LOG)
  kept = [line for line in open(log) if json.loads(line)["step"] <= 2]
  open(log, "w").writelines(kept)
  calls = []
  _counting_train(monkeypatch, calls)
  results = sweep.run_sweep(sweep.plan(f"{DECAY}:base=test", copy, seeds=[0], only=TRAINED), log=lambda s: None)
  assert calls == [broken]
  assert [r["status"] for r in results] == ["trained", "skipped"]
  assert results[0]["summary"]["step"] == 3 and results[0]["summary"]["trained_steps"] == 1
  assert [json.loads(line)["step"] for line in open(log)] == [2, 3]


def test_report_on_the_sweep(trained_sweep, tmp_path):
  workdir, runs, results, _ = trained_sweep
  copy = str(tmp_path / "sweep")  # the report writes into the directory: keep the shared one untouched
  shutil.copytree(workdir, copy)
  written = report.make_report(copy, last_n=5)
  with open(written["csv"]) as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  assert reader.fieldnames[:4] == ["variant", "seeds", "finished", "steps"]
  assert {"final_balanced_acc_mean", "final_balanced_acc_std", "val_selected_balanced_acc_mean",
          "last_n_balanced_acc_mean", "acc_many_mean", "acc_medium_mean", "acc_few_mean", "final_delta",
          "overrides"} <= set(reader.fieldnames)
  assert [r["variant"] for r in rows] == TRAINED
  for row, result in zip(rows, results):
    assert (row["seeds"], row["finished"], row["steps"]) == ("1", "1", "3")
    assert float(row["final_balanced_acc_mean"]) == pytest.approx(result["summary"]["balanced_acc"], abs=1e-4)
  assert rows[1]["overrides"].startswith("bank.beta: linear 0.95→0.999")
  for name in ("balanced_acc", "bank", "per_class", "schedules"):
    data = open(written[name], "rb").read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name
  md = open(written["md"]).read()
  assert "| reference | 1 | 3 |" in md and "| beta_anneal | 1 | 3 |" in md


# --- planning, no training ----------------------------------------------------------------------------------


def _write_sweep_file(tmp_path, variants, seeds="(0,)"):
  path = tmp_path / "my_sweep.py"
  path.write_text("from configs import test\n"
                  f"SEEDS = {seeds}\n"
                  "def get_config(arg=None):\n  return test.get_config(arg)\n"
                  f"def get_sweep():\n  return {variants!r}\n")
  return str(path)


def test_unknown_key_fails_before_any_training(tmp_path, monkeypatch):
  path = _write_sweep_file(tmp_path, [("good", {}), ("typo", {"bank.betta.value": 0.9})])
  calls = []
  _counting_train(monkeypatch, calls, allow=False)
  with pytest.raises(ValueError, match=r"sweep variant 'typo': unknown config key 'bank.betta.value'; "
                                       r"did you mean 'bank.beta'"):
    sweep.run_sweep(sweep.plan(path, str(tmp_path / "out")), log=lambda s: None)
  assert calls == [] and not os.path.exists(tmp_path / "out")


def test_invalid_value_fails_before_any_training(tmp_path):
  path = _write_sweep_file(tmp_path, [("good", {}), ("bad", {"bank.beta.value": 1.5})])
  with pytest.raises(ValueError, match=r"sweep variant 'bad' \(seed 0\): .*bank.beta"):
    sweep.plan(path, str(tmp_path / "out"))


def test_apply_overrides_sets_fields_and_keeps_the_base():
  base = test_config.get_config()
  config = sweep.apply_overrides(base, {"bank.beta": {"kind": "exponential", "rate": 0.9},
                                        "ssl.threshold.value": 1, "miner.enabled": False})
  assert (config.bank.beta.kind, config.bank.beta.rate) == ("exponential", 0.9)
  assert config.bank.beta.value == base.bank.beta.value == 0.99  # fields not named keep the base's value
  assert config.ssl.threshold.value == 1.0 and isinstance(config.ssl.threshold.value, float)
  assert not config.miner.enabled and base.miner.enabled and base.bank.beta.kind == "constant"
  from semi_jax.schedules import schedule_config
  whole = sweep.apply_overrides(base, {"plce.ramp": schedule_config("cosine", value=0.0, end_value=1.0)})
  assert whole.plce.ramp.to_dict() == schedule_config("cosine", value=0.0, end_value=1.0).to_dict()


@pytest.mark.parametrize("overrides,message", [
    ({"bank.beta": 0.95}, r"'bank.beta' is a group of fields .* 'bank.beta.value'"),
    ({"ssl.algo.name": "acr"}, r"'ssl.algo' is a value, not a group"),
    ({"train.total_steps": 2.5}, r"config key 'train.total_steps' cannot take 2.5"),
    ({"nonsense": 1}, r"unknown config key 'nonsense'; fields of the config: .*bank"),
    ({"seed": 3}, r"override 'seed' is not allowed"),
    ({"bank.beta": {"value": 0.9}, "bank.beta.value": 0.8}, r"'bank.beta.value' is set twice"),
    ({"bank.beta": {}}, r"override 'bank.beta' is an empty dict"),
    ({"bank..beta": 1.0}, r"not a dotted config path"),
    ({"bank.size": [4]}, r"has type list"),
])
def test_bad_overrides_are_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    sweep.apply_overrides(test_config.get_config(), overrides, "v")


@pytest.mark.parametrize("variants,kwargs,message", [
    ([("a", {}), ("a", {})], {}, "variant name 'a' appears twice"),
    ([("a/b", {})], {}, "must be a directory name"),
    ([("a", 1)], {}, r"is not a \(name, overrides dict\) pair"),
    ([], {}, "non-empty list"),
    ([("a", {})], {"only": ["b"]}, r"--only names unknown variants \['b'\]"),
    ([("a", {})], {"seeds": [0, 0]}, "repeat a seed"),
    ([("a", {})], {"seeds": [-1]}, "seeds .* are invalid"),
])
def test_bad_sweep_declarations_are_clear_errors(tmp_path, variants, kwargs, message):
  with pytest.raises(ValueError, match=message):
    sweep.plan(_write_sweep_file(tmp_path, variants), str(tmp_path / "out"), **kwargs)


def test_seeds_come_from_the_file_unless_given(tmp_path):
  path = _write_sweep_file(tmp_path, [("a", {"bank.size": 3})], seeds="(4, 5)")
  runs = sweep.plan(path, str(tmp_path))
  assert [(r.seed, r.config.seed, r.config.bank.size) for r in runs] == [(4, 4, 3), (5, 5, 3)]
  assert [r.workdir for r in runs] == [str(tmp_path / "a" / "seed_4"), str(tmp_path / "a" / "seed_5")]
  assert [r.seed for r in sweep.plan(path, str(tmp_path), seeds=[7])] == [7]


def test_workdir_of_another_variant_is_refused(tmp_path, monkeypatch):
  path = _write_sweep_file(tmp_path, [("a", {"bank.size": 3})])
  runs = sweep.plan(path, str(tmp_path / "out"))
  other = sweep.plan(_write_sweep_file(tmp_path, [("a", {"bank.size": 5})]), str(tmp_path / "out"))[0]
  sweep.write_variant_file(other)
  calls = []
  _counting_train(monkeypatch, calls, allow=False)
  sweep.check_workdirs(runs)  # a variant file where no run started (a failed start) protects nothing
  files.write_json_atomic(os.path.join(other.workdir, sweep.CONFIG_FILE), {})  # a run that started
  with pytest.raises(ValueError, match=r"holds a run of variant 'a' seed 0 with overrides \{'bank.size': 5\}"):
    sweep.run_sweep(runs, log=lambda s: None)


def test_bookkeeping_of_a_sweep_on_ram(tmp_path, monkeypatch, ram_dir):
  runs = sweep.plan(_write_sweep_file(tmp_path, [("a", {"bank.size": 3}), ("b", {"bank.size": 5})]), ram_dir)
  assert [r.workdir for r in runs] == [f"{ram_dir}/a/seed_0", f"{ram_dir}/b/seed_0"]
  total = runs[0].config.train.total_steps
  files.makedirs(runs[0].workdir)  # 'a' finished before (launched by hand: no variant file)
  files.write_json_atomic(files.join(runs[0].workdir, sweep.SUMMARY), {"step": total})
  files.makedirs(runs[1].workdir)  # 'b' was killed while writing its summary
  files.write_text_atomic(files.join(runs[1].workdir, sweep.SUMMARY), '{"step": ')
  assert sweep.is_finished(runs[0]) and not sweep.is_finished(runs[1])
  trained = []

  def fake_train(config, workdir):
    trained.append(workdir)
    files.write_json_atomic(files.join(workdir, sweep.SUMMARY), {"step": config.train.total_steps})
    return {"step": config.train.total_steps}

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  results = sweep.run_sweep(runs, log=lambda s: None)
  assert trained == [runs[1].workdir]
  assert [(r["status"], r["summary"]) for r in results] == [("skipped", {"step": total}), ("trained", {"step": total})]
  for run in runs:
    meta = files.read_json(files.join(run.workdir, sweep.VARIANT_FILE))
    assert (meta["name"], meta["seed"], meta["overrides"]) == (run.variant, 0, run.overrides)
    assert files.listdir(run.workdir) == [sweep.SUMMARY, sweep.VARIANT_FILE]  # no temporary file left
  assert [r["status"] for r in sweep.run_sweep(runs, log=lambda s: None)] == ["skipped", "skipped"]
  assert trained == [runs[1].workdir]
  other = sweep.plan(_write_sweep_file(tmp_path, [("a", {"bank.size": 4})]), ram_dir)
  with pytest.raises(ValueError, match=r"holds a run of variant 'a' seed 0 with overrides \{'bank.size': 3\}"):
    sweep.check_workdirs(other)


def test_a_preempted_run_stops_the_sweep(tmp_path, monkeypatch):
  runs = sweep.plan(_write_sweep_file(tmp_path, [("a", {}), ("b", {"bank.size": 5})]), str(tmp_path / "sweep"))
  trained = []

  def preempted_train(config, workdir):
    trained.append(workdir)
    return {"step": 1, "trained_steps": 1, "preempted": True}

  monkeypatch.setattr(train, "train_and_evaluate", preempted_train)
  messages = []
  results = sweep.run_sweep(runs, log=messages.append)
  assert trained == [runs[0].workdir] and [r["status"] for r in results] == ["preempted"]
  assert "Rerun the same command to continue the sweep" in messages[-1]


def test_print_commands_write_the_variant_files_on_ram(tmp_path, capsys, ram_dir):
  path = _write_sweep_file(tmp_path, [("a", {}), ("b", {"bank.size": 5})], seeds="(0, 1)")
  flag_values = types.SimpleNamespace(config=path, workdir=ram_dir, seeds=None, only=None, print_commands=True,
                                      together=False, run_axis_size=-1)
  sweep.main(["sweep"], flag_values)
  assert len(capsys.readouterr().out.strip().splitlines()) == 4
  assert files.listdir(ram_dir) == ["a", "b"] and files.listdir(f"{ram_dir}/b") == ["seed_0", "seed_1"]
  meta = files.read_json(f"{ram_dir}/b/seed_1/{sweep.VARIANT_FILE}")
  assert (meta["name"], meta["seed"], meta["overrides"]) == ("b", 1, {"bank.size": 5})


def test_the_sweep_file_must_be_local(tmp_path):
  with pytest.raises(ValueError, match=r"sweep file 'gs://bucket/decay.py' must be a local file"):
    sweep.plan("gs://bucket/decay.py", str(tmp_path))


def _leaves(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


@pytest.mark.parametrize("arg", ["base=test", None, "base=cifar10_lt,dist=reversed"])
def test_decay_variants_change_only_their_keys(arg):
  spec = DECAY if arg is None else f"{DECAY}:{arg}"
  runs = sweep.plan(spec, "/unused", seeds=[0])
  assert [r.variant for r in runs] == ["reference", "beta_0.95", "no_decay", "beta_anneal", "decay_every_x4",
                                       "ramp_reference", "ramp_constant", "threshold_step", "miner_scale_ramp",
                                       "weight_decayed_inverse", "weight_epoch_counts"]
  reference = _leaves(runs[0].config.to_dict())
  for run in runs[1:]:
    changed = {k for k, v in _leaves(run.config.to_dict()).items() if reference[k] != v}
    assert changed and changed <= set(sweep.flatten_overrides(run.overrides)), run.variant
  if arg and "cifar10_lt" in arg:
    assert runs[0].config.data.unlabeled_dist == "reversed" and runs[0].config.data.name == "cifar10"
    assert runs[4].config.bank.decay_every.value == 400.0  # 4 x the base's 100


def test_component_variants_follow_the_algorithm_presets():
  runs = {r.variant: r.config for r in sweep.plan(COMPONENTS, "/unused", seeds=[0])}
  for algo in ("fixmatch", "acr", "semi"):
    preset = default.apply_algo(components.get_config(), algo)
    assert _leaves(runs[algo].to_dict()) == _leaves(preset.to_dict()), algo
  assert not runs["semi_no_miner"].miner.enabled and runs["semi_no_miner"].plce.enabled
  assert not runs["semi_no_bank"].bank.enabled and not runs["semi_no_bank"].plce.enabled
  assert runs["acr_miner_plce"].plce.enabled and not runs["acr_miner_plce"].cons.enabled


def test_override_flags():
  flat = sweep.override_flags({"bank.beta": {"kind": "linear", "value": 0.9}, "miner.enabled": False,
                               "train.total_steps": 7, "ssl.algo": "acr"})
  assert flat == ["--config.bank.beta.kind=linear", "--config.bank.beta.value=0.9",
                  "--config.miner.enabled=false", "--config.train.total_steps=7", "--config.ssl.algo=acr"]


def _sweep_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "semi_jax.sweep", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=180)


def _parse_main_command(argv):
  """Parses semi_jax.main's flags the way main.py declares them (locked config, so unknown keys fail)."""
  fv = flags.FlagValues()
  argv = ["main", *argv]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir


@pytest.mark.parametrize("spec,seeds", [(f"{DECAY}:base=test", "0,1"), (COMPONENTS, "3")])
def test_print_commands_parse_back_to_the_planned_configs(tmp_path, spec, seeds):
  workdir = str(tmp_path / "sweep")
  r = _sweep_cli(f"--config={spec}", f"--workdir={workdir}", f"--seeds={seeds}", "--print_commands")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  runs = sweep.plan(spec, workdir, seeds=[int(s) for s in seeds.split(",")])
  assert len(lines) == len(runs)
  for line, run in zip(lines, runs):
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "semi_jax.main"]
    config, run_workdir = _parse_main_command(argv[3:])
    assert run_workdir == run.workdir
    assert config.to_dict() == run.config.to_dict(), run.variant
    meta = json.load(open(os.path.join(run.workdir, sweep.VARIANT_FILE)))
    assert (meta["name"], meta["seed"], meta["overrides"]) == (run.variant, run.seed, run.overrides)
  assert not any(os.path.exists(os.path.join(run.workdir, "checkpoints")) for run in runs)


def test_cli_reports_a_bad_sweep_in_one_line(tmp_path):
  path = _write_sweep_file(tmp_path, [("good", {}), ("typo", {"bank.betta.value": 0.9})])
  r = _sweep_cli(f"--config={path}", f"--workdir={tmp_path / 'out'}")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "sweep variant 'typo': unknown config key 'bank.betta.value'" in r.stderr
  assert not os.path.exists(tmp_path / "out")


def test_file_names_match_the_training_loop():
  assert (sweep.SUMMARY, report.EVAL_LOG) == (outputs.SUMMARY, outputs.EVAL_LOG)
