"""The CPU fast paths: when they are on, and that they change nothing but speed."""
import jax
import numpy as np
import pytest
from step_helpers import packed, program, run_steps, view_batches

from configs import test as test_config
from semi_jax import cpu, sharding, train
from semi_jax import train_step as steps
from semi_jax.cpu import compiler_options


def test_the_settings_are_the_documented_three_and_each_is_accepted():
  assert cpu.SETTINGS == ("auto", "on", "off")  # docs/config.md names these
  assert [cpu.check_setting(s) for s in ("auto", "on", "off")] == ["auto", "on", "off"]


@pytest.mark.parametrize("setting", ["fast", "", "ON", "true", None])
def test_a_bad_setting_is_an_error_naming_the_allowed_values(setting):
  with pytest.raises(ValueError, match=r"cpu_fast_paths must be one of \('auto', 'on', 'off'\)"):
    cpu.check_setting(setting)
  with pytest.raises(ValueError, match=r"cpu_fast_paths must be one of \('auto', 'on', 'off'\)"):
    cpu.enabled(setting, {"cpu"})


@pytest.mark.parametrize("platforms, want", [
    ({"cpu"}, True), (["cpu", "cpu"], True),
    ({"tpu"}, False), ({"gpu"}, False), ({"cuda"}, False), ({"rocm"}, False), ({"cpu", "gpu"}, False),
    (set(), False),  # no devices: nothing says CPU
])
def test_auto_is_on_exactly_when_every_device_is_a_cpu(platforms, want):
  assert cpu.enabled("auto", platforms) is want


@pytest.mark.parametrize("platforms", [{"cpu"}, {"tpu"}, {"gpu"}, {"cpu", "gpu"}, set()])
def test_on_and_off_whatever_the_platform(platforms):
  assert cpu.enabled("on", platforms) is True
  assert cpu.enabled("off", platforms) is False


def test_platforms_of_a_cpu_mesh():
  mesh = jax.make_mesh((8,), ("data",))
  assert mesh.devices.size == 8
  assert cpu.platforms_of(mesh) == {"cpu"}
  assert cpu.enabled("auto", cpu.platforms_of(mesh)) is True
  two_axes = jax.make_mesh((4, 2), ("data", "model"))
  assert cpu.platforms_of(two_axes) == {"cpu"}


# --- the full train step with the fast paths on and off --------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return train.Trainer(test_config.get_config(), str(tmp_path_factory.mktemp("trainer")))


def _config(setting):
  config = test_config.get_config()
  config.cpu_fast_paths = setting
  config.ssl.threshold.value = 0.16  # some rows unconfident by the third step: Lcons is live too
  return config


def _assert_close(a, b, what):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x)), what
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5, err_msg=what)


def test_a_program_on_cpus_gets_the_fast_paths_and_one_for_accelerators_does_not(trainer):
  mesh = trainer.mesh
  on, off = program(trainer, mesh, _config("on")), program(trainer, mesh, _config("off"))
  auto_cpu, auto_tpu = (program(trainer, mesh, _config("auto"), platforms=p) for p in (None, {"tpu"}))
  assert on.cpu_fast_paths and on.ctx.model.cpu_fast_paths and on.compiler_options == compiler_options.for_run(True)
  assert auto_cpu.cpu_fast_paths and auto_cpu.compiler_options == on.compiler_options
  for prog in (off, auto_tpu):
    assert not prog.cpu_fast_paths and not prog.ctx.model.cpu_fast_paths and prog.compiler_options == {}
  # The fast paths' layers are really in the model: their hand-written gradients are custom_vjp calls.
  state = jax.eval_shape(on.init_state, jax.random.key(0))
  images = jax.ShapeDtypeStruct((4, 8, 8, 3), np.float32)
  forward = lambda prog: str(jax.make_jaxpr(lambda s, x: prog.ctx.model.apply(
      {"params": s.params, "batch_stats": s.batch_stats}, x, train=True, mutable=["batch_stats"]))(state, images))
  assert forward(on).count("custom_vjp_call") == 9 + 5  # the 9 convolutions and 5 BatchNorms of WRN-10-1
  assert "custom_vjp_call" not in forward(off)


@pytest.mark.parametrize("devices", [1, 8])
def test_same_gradients_losses_and_state_over_three_steps(trainer, devices):
  """The WRN train step with semi_jax.cpu's layers and compiler options, and with flax's layers and XLA's
  defaults: the first step's gradients, and every step's metrics and state, agree to float rounding."""
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  batches = view_batches(trainer, 3)
  results = {setting: run_steps(trainer, mesh, batches, config=_config(setting)) for setting in ("on", "off")}
  (state_on, outs_on), (state_off, outs_off) = results["on"], results["off"]
  for step, (a, b) in enumerate(zip(outs_on, outs_off)):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5, err_msg=f"step {step}: {key}")
  assert outs_on[-1]["loss_cons"] > 0 and outs_on[-1]["plce_weight"] > 0  # every SeMi term is live
  _assert_close(state_on, state_off, "state after three steps")

  grads = {}
  for setting in ("on", "off"):
    prog = program(trainer, mesh, _config(setting))
    batch = sharding.to_global(packed(batches[0], prog.ctx.data_blocks), mesh)
    fn = jax.jit(lambda s, b, ctx=prog.ctx: steps.compute_gradients(s, b, trainer.step_rng, ctx)[:2],
                 compiler_options=prog.compiler_options or None)
    grads[setting] = jax.device_get(fn(jax.device_put(jax.device_get(trainer.state), sharding.replicated(mesh)),
                                       batch))
  _assert_close(grads["on"], grads["off"], "gradients and BatchNorm statistics of the first step")
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["on"][0])) > 0
