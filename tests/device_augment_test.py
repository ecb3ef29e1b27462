"""Tests of semi_jax.device_augment: every op against the host path (`augment`, itself checked against PIL), the
distributions of the random draws, keys that follow the stream position, views that do not depend on the mesh or
the process count, the source stream of the input pipeline, the config field and a run that makes its views in
the step."""
import os
import re
import subprocess
import sys

import device_augment_worker as worker
import jax
import numpy as np
import processes
import pytest
import tensorflow as tf

from configs import test as test_config
from semi_jax import augment, config_validation, device_augment, input_pipeline, sharding, train
from semi_jax import program as program_lib

SETTINGS = device_augment.Settings()
LEVELS = range(1, device_augment.MAX_LEVEL)  # the levels RandAugment draws at the default magnitude
# Integer arithmetic on both paths gives the host's pixels exactly; these blend or stretch in float32 on the
# device (float32 / float64 on the host), within one intensity level.
FLOAT_OPS = ("AutoContrast", "Brightness", "Color", "Contrast", "Sharpness")
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
# 99.9 % quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, dof)) by degrees of freedom.
CHI2_999 = {4: 18.467, 8: 26.124, 11: 31.264, 13: 34.528}


@pytest.fixture
def rng():
  return np.random.default_rng(19)


def _chi2(counts, expected):
  return float(np.sum((counts - expected) ** 2 / expected))


# ---------------------------------------------------------------------------------------------------------
# The ops against the host path.


def test_op_table_and_constants_are_the_host_ones():
  assert device_augment.OP_NAMES == tuple(augment.OPS)
  assert device_augment.IDENTITY == list(augment.OPS).index("Identity")
  assert (device_augment.MAX_LEVEL, device_augment.CUTOUT_GRAY, device_augment.AFFINE_FILL) == (
      augment.MAX_LEVEL, augment.CUTOUT_GRAY, augment.AFFINE_FILL)


@pytest.fixture(scope="module")
def op_outputs():
  """(images, host [op, level, image], device [op, level, sign, image]) for every op at the levels 1..9: the
  host op draws its sign from its seed, the device op is run with both signs (in one jitted call)."""
  rng = np.random.default_rng(7)
  images = np.stack([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                     rng.integers(70, 140, (16, 16, 3), dtype=np.uint8),
                     np.clip(rng.normal(128, 30, (16, 16, 3)), 0, 255).astype(np.uint8)])
  grid = np.array([(op, level, negate, k) for op in range(len(device_augment.OP_NAMES)) for level in LEVELS
                   for negate in (0, 1) for k in range(len(images))])
  device = jax.jit(jax.vmap(device_augment.apply_op))(images[grid[:, 3]], grid[:, 0], grid[:, 1],
                                                      grid[:, 2].astype(bool))
  device = np.asarray(device).reshape(len(device_augment.OP_NAMES), len(LEVELS), 2, len(images), 16, 16, 3)
  host = np.stack([np.stack([np.stack([
      augment.apply_op(tf.constant(image), op, level, tf.constant([level, 31 * op + k])).numpy()
      for k, image in enumerate(images)]) for level in LEVELS]) for op in range(len(device_augment.OP_NAMES))])
  return images, host.astype(np.int32), device.astype(np.int32)


@pytest.mark.parametrize("name", device_augment.OP_NAMES)
def test_op_matches_the_host_within_one_level(name, op_outputs):
  images, host, device = op_outputs
  op = device_augment.OP_NAMES.index(name)
  tolerance = 1 if name in FLOAT_OPS else 0
  signs_seen = set()
  for i, level in enumerate(LEVELS):
    for k in range(len(images)):
      errors = [int(np.abs(device[op, i, negate, k] - host[op, i, k]).max()) for negate in (0, 1)]
      assert min(errors) <= tolerance, f"{name} level {level} image {k}: off by {min(errors)} from the host"
      matching = [negate for negate in (0, 1) if errors[negate] <= tolerance]
      if len(matching) == 1:
        signs_seen.add(matching[0])
      if name not in SIGNED_OPS:
        assert errors[0] == errors[1], f"{name} does not take a sign"
  if name in SIGNED_OPS:  # the host drew both signs, and the device's sign is the op's parameter sign
    assert signs_seen == {0, 1}
  if name != "Identity":  # the op does something at these levels
    assert np.any(device[op] != images[None, None])


def test_flip_crop_and_cutout_match_the_host(rng):
  image = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
  pad = 3
  combos = np.array([(flip, oy, ox) for flip in (0, 1) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)])
  device = np.asarray(jax.jit(jax.vmap(lambda f, y, x: device_augment.flip_and_crop(image, f, y, x, pad)))(
      combos[:, 0].astype(bool), combos[:, 1], combos[:, 2]))
  for (flip, oy, ox), got in zip(combos, device):
    source = augment.horizontal_flip(tf.constant(image)) if flip else tf.constant(image)
    np.testing.assert_array_equal(got, augment.pad_and_crop(source, pad, tf.constant(oy), tf.constant(ox)).numpy())
  for top, left, side in ((0, 0, 6), (3, 5, 6), (9, -2, 6), (-3, 10, 6), (4, 4, 0)):
    np.testing.assert_array_equal(np.asarray(device_augment.cutout(image, top, left, side)),
                                  augment.cutout(tf.constant(image), tf.constant(top), tf.constant(left),
                                                 side).numpy())


def test_level_tables_are_the_host_mapping():
  """The level -> parameter tables are the host's float64 expressions (exactly, not only up to rounding)."""
  levels = tf.constant(list(range(device_augment.MAX_LEVEL + 1)), tf.float64)
  np.testing.assert_array_equal(device_augment.ENHANCE_FACTORS, augment._float_level(levels, 0.9, 0.05).numpy())
  np.testing.assert_array_equal(device_augment.POSTERIZE_BITS, augment._int_level(levels, 4).numpy() + 4)
  np.testing.assert_array_equal(device_augment.SOLARIZE_THRESHOLDS, 256 - augment._int_level(levels, 256).numpy())


# ---------------------------------------------------------------------------------------------------------
# The random draws.


def test_op_level_and_sign_draws_follow_randaugment():
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  ops, levels, negate = (np.asarray(a) for a in jax.vmap(lambda k: device_augment.sample_ops(k, 2, 10))(keys))
  assert ops.shape == levels.shape == negate.shape == (n, 2)
  for slot in range(2):  # each slot: Identity when skipped (1/2), else uniform over the 14 ops
    expected = np.full(14, n * 0.5 / 14)
    expected[device_augment.IDENTITY] += n * 0.5
    assert _chi2(np.bincount(ops[:, slot], minlength=14), expected) < CHI2_999[13]
    assert _chi2(np.bincount(levels[:, slot] - 1, minlength=9), np.full(9, n / 9)) < CHI2_999[8]
    assert abs(negate[:, slot].mean() - 0.5) < 4 * 0.5 / np.sqrt(n)
  # The two slots draw independently: both Identity with probability (1/2 + 1/28)^2.
  both_identity = np.mean(np.all(ops == device_augment.IDENTITY, axis=1))
  p = (0.5 + 0.5 / 14) ** 2
  assert abs(both_identity - p) < 4 * np.sqrt(p * (1 - p) / n)
  _, few_levels, _ = jax.vmap(lambda k: device_augment.sample_ops(k, 2, 4))(keys[:2000])
  assert set(np.unique(np.asarray(few_levels))) == {1, 2, 3}


def test_flip_crop_and_cutout_draws_are_uniform():
  n, size, pad, side = 20000, 16, 2, 8
  keys = jax.random.split(jax.random.key(1), n)
  flip, offset_y, offset_x = (np.asarray(a) for a in jax.vmap(
      lambda k: device_augment.sample_weak(k, size, size, pad))(keys))
  assert abs(flip.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)
  for offsets in (offset_y, offset_x):
    assert _chi2(np.bincount(offsets, minlength=2 * pad + 1), np.full(2 * pad + 1, n / (2 * pad + 1))) < CHI2_999[4]
  top, left = (np.asarray(a) for a in jax.vmap(lambda k: device_augment.sample_cutout(k, size, size, side))(keys))
  # A centre uniform over [0, 16) and a corner clipped at 0: top 0 with probability 5/16, 1..11 each 1/16.
  expected = n * np.array([5] + [1] * 11) / 16
  for corner in (top, left):
    assert _chi2(np.bincount(corner, minlength=12), expected) < CHI2_999[11]


def test_strong_view_applies_each_op_with_probability_one_half(rng):
  # As the host's test: on 32x32 an op slot leaves an image whose channels span 0..255 unchanged when skipped or
  # when it draws Identity, AutoContrast, or TranslateX/Y at level 1 (0 px): P = (1/2 + 1/2 (2/14 + 2/14 / 9))^2.
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  image[0, 0], image[0, 1] = 0, 255
  settings = device_augment.Settings(pad_fraction=0.0, cutout_fraction=0.0)
  views = jax.jit(jax.vmap(lambda k: device_augment.strong_view(image, k, settings)))(
      jax.random.split(jax.random.key(8), 400))
  views = np.asarray(views)
  unchanged = np.all(views == image, axis=(1, 2, 3)) | np.all(views == image[:, ::-1], axis=(1, 2, 3))
  assert 0.25 <= unchanged.mean() <= 0.43


# ---------------------------------------------------------------------------------------------------------
# Keys: the stream position decides the views.


def test_views_follow_the_stream_position_not_the_row(rng):
  images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  positions = np.array([3, 10, 11, 500, 2**31 - 1, 0, 7, 8], np.int32)
  root = device_augment.root_key(jax.random.key(5))
  unlabeled = jax.jit(lambda i, p, r: device_augment.unlabeled_batch(i, p, r, SETTINGS))
  views = [np.asarray(v) for v in unlabeled(images, positions, root)]
  order = rng.permutation(8)
  shuffled = [np.asarray(v) for v in unlabeled(images[order], positions[order], root)]
  for got, want in zip(shuffled, views):  # the same (image, position) in another row: the same views
    np.testing.assert_array_equal(got, want[order])
  moved = [np.asarray(v) for v in unlabeled(images, positions + 1, root)]
  other_seed = [np.asarray(v) for v in unlabeled(images, positions, device_augment.root_key(jax.random.key(6)))]
  weak_labeled = np.asarray(jax.jit(lambda i, p, r: device_augment.labeled_batch(i, p, r, SETTINGS))(
      images, positions, root))
  differs = lambda a, b: np.mean([not np.array_equal(x, y) for x, y in zip(a, b)])
  assert differs(views[1], views[2]) == 1.0  # two strong views of an image
  for other in (moved, other_seed):
    assert differs(other[1], views[1]) == 1.0 and differs(other[2], views[2]) == 1.0
  assert differs(weak_labeled, views[0]) >= 0.5  # the labeled stream has its own keys (a weak view: 50 choices)


# ---------------------------------------------------------------------------------------------------------
# Sharding: 1 device, 8 devices, 2 processes.


def _collectives(hlo_text):
  return re.findall(r"= \S+ (all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter)(?:-start)?\(",
                    hlo_text)


@pytest.fixture(scope="module")
def one_device_views():
  batch = worker.source_batch()
  return [np.asarray(v) for v in worker.views_on(sharding.make_mesh(devices=jax.devices()[:1]), *batch)]


def test_views_are_the_stream_views_in_the_step_layout(one_device_views):
  x, u, x_positions, u_positions = worker.source_batch()
  root = device_augment.root_key(jax.random.key(worker.STEP_SEED))
  stream_views = jax.jit(lambda r: (device_augment.labeled_batch(x, x_positions, r, SETTINGS),
                                    *device_augment.unlabeled_batch(u, u_positions, r, SETTINGS)))(root)
  for got, want in zip(one_device_views, stream_views):
    np.testing.assert_array_equal(got, np.asarray(want))


def test_views_equal_on_8_devices_without_moving_data(one_device_views):
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  batch = worker.global_batch(mesh, *worker.source_batch())
  key = jax.random.key(worker.STEP_SEED)
  compiled = worker.make_views(8).lower(*batch, key).compile()
  # Each device makes the views of its own rows: the compiled program has no collective at all.
  assert _collectives(compiled.as_text()) == []
  for got, want in zip(compiled(*batch, key), one_device_views):
    assert got.sharding.spec == jax.sharding.PartitionSpec(sharding.DATA_AXIS)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_views_equal_with_two_processes(tmp_path, one_device_views):
  out = str(tmp_path / "views.npz")
  port = processes.free_port()
  children = [subprocess.Popen([sys.executable, os.path.join(processes.REPO, "tests", "device_augment_worker.py"), out],
                               cwd=processes.REPO, env=processes.child_env(port, pid, 2, 4), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True) for pid in range(2)]
  logs = []
  try:
    for child in children:
      logs.append(child.communicate(timeout=180)[0].decode(errors="replace"))
  finally:
    for child in children:
      if child.poll() is None:
        os.killpg(child.pid, 9)
        child.wait()
  assert [c.returncode for c in children] == [0, 0], "\n".join(log[-3000:] for log in logs)
  with np.load(out) as views:
    for i, want in enumerate(one_device_views):
      np.testing.assert_array_equal(views[f"arr_{i}"], want)


# ---------------------------------------------------------------------------------------------------------
# The input pipeline's source stream.


@pytest.fixture(scope="module")
def stream_setup():
  config = test_config.get_config()
  config.train.total_steps = 40
  from semi_jax import datasets
  data = input_pipeline.make_ssl_data(datasets.load(config.data), config.data, config.seed)
  return config, data


def _take(ds, n):
  return [b for _, b in zip(range(n), input_pipeline.as_numpy(ds))]


def test_source_stream_has_the_examples_and_positions_of_the_host_stream(stream_setup):
  config, data = stream_setup
  b, u = config.train.batch_size, config.train.batch_size * config.train.mu
  host = _take(input_pipeline.train_views(data, config), 3)
  sources = _take(input_pipeline.train_views(data, config, views_on_device=True), 3)
  pool = data.dataset.train_images[data.labeled_idx]
  for step, (h, s) in enumerate(zip(host, sources)):
    assert set(s) == {"x", "x_position", "y", "u", "u_position", "u_label", "u_index"}
    assert s["x_position"].dtype == s["u_position"].dtype == np.int32
    np.testing.assert_array_equal(s["x_position"], step * b + np.arange(b))
    np.testing.assert_array_equal(s["u_position"], step * u + np.arange(u))
    for k in ("y", "u_label", "u_index"):
      np.testing.assert_array_equal(s[k], h[k], err_msg=k)
    np.testing.assert_array_equal(s["u"], data.unlabeled_images[s["u_index"]])
    for image, label in zip(s["x"], s["y"]):  # every labeled source is an image of the labeled set, of its class
      rows = np.all(pool == image, axis=(1, 2, 3))
      assert rows.any() and label in data.dataset.train_labels[data.labeled_idx][rows]
  resumed = _take(input_pipeline.train_views(data, config, start_step=2, views_on_device=True), 1)[0]
  second_process = _take(input_pipeline.train_views(data, config, process_index=1, process_count=2,
                                                    views_on_device=True), 1)[0]
  for k in sources[2]:
    np.testing.assert_array_equal(resumed[k], sources[2][k], err_msg=k)
    np.testing.assert_array_equal(second_process[k], np.split(sources[0][k], 2)[1], err_msg=k)
  packed = _take(input_pipeline.train_dataset(data, config, blocks=2, views_on_device=True), 1)[0]
  assert set(packed) == {"images", "positions", "y", "u_label", "u_index"}
  np.testing.assert_array_equal(packed["images"], input_pipeline.pack_views([sources[0]["x"], sources[0]["u"]], 2))
  np.testing.assert_array_equal(packed["positions"], input_pipeline.pack_views(
      [sources[0]["x_position"], sources[0]["u_position"]], 2))


# ---------------------------------------------------------------------------------------------------------
# Config and a run.


def test_augment_on_is_validated_and_resolved():
  config = test_config.get_config()
  assert config.data.augment_on == "auto"
  config_validation.validate(config)
  for value, message in (("gpu", r"data.augment_on='gpu' is invalid: choose one of \('host', 'device', 'auto'\)"),
                         ("Device", "data.augment_on='Device' is invalid")):
    config.data.augment_on = value
    with pytest.raises(config_validation.ConfigError, match=message):
      config_validation.validate(config)
  config.data.augment_on = "device"
  config_validation.validate(config)
  config.train.total_steps = 2**28
  with pytest.raises(config_validation.ConfigError, match=r"data.augment_on='device' is invalid: .*int32 .*"
                                                          r"use data.augment_on=host"):
    config_validation.validate(config)
  config.train.total_steps = 3
  config.data.randaugment_magnitude = 30
  with pytest.raises(config_validation.ConfigError, match=r"magnitude must be an int in \[2, 10\].*augment_on=host"):
    config_validation.validate(config)
  on = device_augment.runs_on_device
  assert on("auto", {"gpu"}) and on("auto", {"cuda"}) and on("device", {"cpu"}) and on("device", {"tpu"})
  assert not any((on("auto", {"cpu"}), on("auto", {"tpu"}), on("auto", {"tpu", "cuda"}), on("auto", set()),
                  on("host", {"gpu"})))
  with pytest.raises(ValueError, match="data.augment_on must be one of"):
    on("gpu", {"gpu"})


def test_programs_for_gpus_make_the_views_in_the_step():
  config = test_config.get_config()
  mesh = sharding.make_mesh()
  build = lambda platforms: program_lib.build_program(config, mesh, num_classes=10, class_prior=np.full(10, 0.1),
                                                mean=np.full(3, 0.5), std=np.full(3, 0.25), platforms=platforms)
  assert build(("cuda",)).views_on_device and not build(("tpu", "cuda")).views_on_device
  assert not build(None).views_on_device  # this machine's CPU devices: auto keeps tf.data
  spec = program_lib.batch_spec(config, mesh, views_on_device=True)
  b, u = config.train.batch_size, config.train.batch_size * config.train.mu
  assert spec["images"].shape == (b + u, 8, 8, 3) and spec["positions"].shape == (b + u,)
  assert spec["positions"].sharding == sharding.batch_sharded(mesh)


def test_a_run_makes_its_views_in_the_step(tmp_path):
  """train_and_evaluate with data.augment_on=device on 8 devices: the source stream feeds the step, which makes
  the views without moving its input between devices."""
  config = test_config.get_config()
  config.data.augment_on = "device"
  trainer = train.Trainer(config, str(tmp_path))
  assert trainer.program.views_on_device
  summary = trainer.run()
  assert summary["step"] == config.train.total_steps and np.isfinite(summary["balanced_acc"])
  program = trainer.program
  repl = sharding.replicated(trainer.mesh)
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), tree)
  args = (abstract(jax.eval_shape(program.init_state, jax.random.key(0))), abstract(jax.eval_shape(program.init_carry)),
          program_lib.batch_spec(config, trainer.mesh, views_on_device=True), trainer.step_rng)
  ops = _collectives(program.train_step.lower(*args).compile().as_text())
  assert "all-to-all" not in ops and "collective-permute" not in ops, sorted(set(ops))
