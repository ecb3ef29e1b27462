"""semi_jax.tools.bench_reference: the step-alternating driver (with stand-in workers), the semi_jax worker, the
reference worker's extraction of the training-loop body, and the errors for bad paths and broken workers.
torch is not needed: the reference worker's torch part only runs where torch and the reference code are."""
import ast
import sys
import textwrap

import pytest

from semi_jax.tools import bench_reference as br
from semi_jax.tools import reference_worker as rw


def fake_worker(name: str, ms: float, log: str = "", die_at_step: int | None = None, ready: bool = True) -> br.Worker:
  """A worker that answers every step with `ms`, appends its name to `log` per step, prints unprefixed noise,
  and with `die_at_step` exits there with a message on stderr."""
  script = textwrap.dedent(f"""
      import sys, json
      if not {ready}:
        sys.stderr.write("no luck starting"); sys.exit(3)
      print("some output of the worker's own"); print("@ready " + json.dumps({{"name": {name!r}}}), flush=True)
      for i, _ in enumerate(sys.stdin):
        if i == {die_at_step!r}:
          sys.stderr.write("boom at step %d" % i); sys.exit(2)
        if {log!r}:
          open({log!r}, "a").write({name!r} + "\\n")
        print("noise"); print("@ms {ms}", flush=True)
  """)
  return br.Worker(name, [sys.executable, "-c", script])


def test_alternate_rotates_the_order_and_summarise_gives_the_ratios(tmp_path):
  log = str(tmp_path / "order.txt")
  workers = {"semi_jax": fake_worker("semi_jax", 10.0, log), "reference_full": fake_worker("reference_full", 20.0, log),
             "reference_core": fake_worker("reference_core", 8.0, log)}
  try:
    assert workers["reference_core"].info == {"name": "reference_core"}
    times = br.alternate(workers, rounds=4)
  finally:
    for w in workers.values():
      w.close()
  assert times == {"semi_jax": [10.0] * 4, "reference_full": [20.0] * 4, "reference_core": [8.0] * 4}
  order = (tmp_path / "order.txt").read_text().split()
  s, f, c = "semi_jax", "reference_full", "reference_core"
  assert order == [s, f, c, f, c, s, c, s, f, s, f, c]  # round r starts with worker r mod 3
  result = br.summarise(times)
  assert result["workers"]["reference_full"] == {"median_ms": 20.0, "min_ms": 20.0, "max_ms": 20.0, "steps": 4}
  full, core = result["ratios"]["reference_full"], result["ratios"]["reference_core"]
  assert full["ratio_of_medians"] == pytest.approx(0.5) and full["median_per_round_ratio"] == pytest.approx(0.5)
  assert full["rounds_below_1"] == 4 and core["rounds_below_1"] == 0
  assert core["ratio_of_medians"] == pytest.approx(1.25)
  report = br.format_report(result)
  assert "semi_jax / reference_full: 0.500" in report and "below 1.0 in 0 of 4 rounds" in report


def test_summarise_pairs_steps_round_by_round():
  times = {"semi_jax": [10.0, 30.0, 20.0], "ref": [20.0, 20.0, 40.0]}
  ratios = br.summarise(times)["ratios"]["ref"]
  assert ratios["median_per_round_ratio"] == pytest.approx(0.5)  # of 0.5, 1.5, 0.5
  assert ratios["ratio_of_medians"] == pytest.approx(1.0)  # 20 / 20
  assert (ratios["min_per_round_ratio"], ratios["max_per_round_ratio"]) == (pytest.approx(0.5), pytest.approx(1.5))


def test_a_worker_that_stops_is_reported_with_its_stderr():
  worker = fake_worker("reference_full", 5.0, die_at_step=1)
  try:
    assert worker.step() == 5.0
    with pytest.raises(br.WorkerError, match=r"(?s)reference_full worker exited \(code 2\).*boom at step 1"):
      worker.step()
  finally:
    worker.close()
  with pytest.raises(br.WorkerError, match=r"(?s)semi_jax worker exited \(code 3\) before printing '@ready'"
                                           r".*no luck starting"):
    fake_worker("semi_jax", 1.0, ready=False)


def test_bad_paths_are_clear_errors(tmp_path):
  with pytest.raises(SystemExit, match="not a checkout of pywin/SeMi"):
    br.main([f"--reference_repo={tmp_path}", f"--torch_python={sys.executable}"])
  (tmp_path / "train_semi.py").write_text("")
  with pytest.raises(SystemExit, match="--torch_python=.*nope is not an executable"):
    br.main([f"--reference_repo={tmp_path}", f"--torch_python={tmp_path / 'nope'}"])
  with pytest.raises(SystemExit, match="lacks models/wideresnet.py"):
    rw.main([f"--repo={tmp_path}"])


def test_the_semi_jax_worker_runs_compiled_steps_with_the_cpu_fast_paths():
  worker = br.Worker("semi_jax", [sys.executable, "-m", "semi_jax.tools.bench_reference", "--worker=jax", "--quick"])
  try:
    assert worker.info["algo"] == "semi" and worker.info["quick"] and worker.info["compile_s"] > 0
    assert worker.info["device_kind"] and worker.info["backend"] == "cpu"
    assert worker.info["cpu_fast_paths"] is True and worker.info["compiler_options"]
    assert worker.info["host_malloc"] == "one arena, no mmap, no trim"
    times = [worker.step() for _ in range(2)]
  finally:
    worker.close()
  assert all(t > 0 for t in times)


TRAIN_SEMI_LIKE = '''
import torch

def interleave(x, size):
    return ("interleaved", x, size)

def de_interleave(x, size):
    return ("de_interleaved", x, size)

def other():
    pass

def train(args, model):
    for epoch in range(3):
        for batch_idx in range(args.eval_step):
            try:
                inputs_x = labeled_iter.next()
            except:
                inputs_x = None
            try:
                inputs_u = unlabeled_iter.next()
            except:
                inputs_u = None
            out = interleave(inputs_x, 2)
            steps.append(batch_idx)
'''


def test_loop_body_is_the_batch_loop_without_the_data_reads():
  helpers, body = rw.loop_body(TRAIN_SEMI_LIKE)
  assert [f.name for f in helpers.body] == ["interleave", "de_interleave"]
  assert [type(s) for s in body.body] == [ast.Assign, ast.Expr]
  scope = {"inputs_x": "x", "batch_idx": 7, "steps": []}
  exec(compile(helpers, "t", "exec"), scope)
  exec(compile(body, "t", "exec"), scope)
  assert scope["out"] == ("interleaved", "x", 2) and scope["steps"] == [7]


def test_loop_body_names_what_is_missing():
  with pytest.raises(ValueError, match="expected module-level interleave"):
    rw.loop_body("def train(args):\n  pass\n")
  only_reads = TRAIN_SEMI_LIKE.split("            out =")[0]
  with pytest.raises(ValueError, match="nothing after its data-loader reads"):
    rw.loop_body(only_reads)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_device_reaches_the_reference_workers_and_a_shared_gpu_is_not_preallocated(tmp_path, monkeypatch,
                                                                                          device):
  (tmp_path / "train_semi.py").write_text("")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  started = {}

  class Recorder:
    def __init__(self, name, argv, env=None):
      started[name] = (argv, env)
      self.info = {}

    def close(self):
      pass

  monkeypatch.setattr(br, "Worker", Recorder)
  monkeypatch.setattr(br, "alternate", lambda workers, rounds: {name: [1.0] * rounds for name in workers})
  br.main([f"--reference_repo={tmp_path}", f"--torch_python={sys.executable}", f"--torch_device={device}",
           "--rounds=2", f"--out={tmp_path / 'out.json'}"])
  assert set(started) == {"semi_jax", "reference_full", "reference_core"}
  for name in ("reference_full", "reference_core"):
    assert f"--device={device}" in started[name][0]
  jax_env = started["semi_jax"][1]
  if device == "cuda":  # the JAX worker shares the GPU with two torch processes
    assert jax_env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  else:
    assert jax_env is None


def test_the_reference_worker_takes_only_cpu_or_cuda(tmp_path):
  with pytest.raises(SystemExit):
    rw.main([f"--repo={tmp_path}", "--device=tpu"])
