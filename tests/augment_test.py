"""Tests of semi_jax.augment: hand-made cases, numpy re-implementations and PIL (the library the PyTorch
reference augments with) as oracles."""
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import tensorflow as tf

from semi_jax import augment


@pytest.fixture
def rng():
  """A fresh generator per test, so each test sees the same images whatever else runs."""
  return np.random.default_rng(1234)


def _seed(a, b=0):
  return tf.constant([a, b], tf.int32)


def _random_image(rng, size, low=0, high=256):
  return rng.integers(low, high, (size, size, 3), dtype=np.uint8)


def _gradient_image(size):
  """Asymmetric in both axes: every pixel differs from its mirror images."""
  y, x = np.mgrid[:size, :size]
  return np.stack([x * 255 // (size - 1), y * 255 // (size - 1), (3 * x + 5 * y) % 256], -1).astype(np.uint8)


def _run(fn, image, *args, **kwargs):
  return fn(tf.constant(image), *args, **kwargs).numpy()


# ---------------------------------------------------------------------------------------------------------
# Views: shapes, dtypes, determinism.


@pytest.mark.parametrize("size", [16, 32])
def test_views_keep_shape_and_dtype(size, rng):
  image = tf.constant(_random_image(rng, size))
  outputs = [augment.weak_augment(image, _seed(1)), augment.strong_augment(image, _seed(2)),
             augment.labeled_view(image, _seed(3)), *augment.unlabeled_views(image, _seed(4))]
  for out in outputs:
    assert out.shape == (size, size, 3)
    assert out.dtype == tf.uint8


@pytest.mark.parametrize("size", [16, 32])
def test_weak_view_only_moves_pixels(size, rng):
  image = _random_image(rng, size)
  input_pixels = {tuple(p) for p in image.reshape(-1, 3)}
  for s in range(5):
    out = _run(augment.weak_augment, image, _seed(s))
    assert {tuple(p) for p in out.reshape(-1, 3)} <= input_pixels


def test_views_are_deterministic_in_the_seed(rng):
  image = tf.constant(_random_image(rng, 32))
  for fn in (augment.weak_augment, augment.strong_augment):
    same_a = fn(image, _seed(7, 9)).numpy()
    same_b = fn(image, tf.constant([7, 9], tf.int64)).numpy()
    np.testing.assert_array_equal(same_a, fn(image, _seed(7, 9)).numpy())
    np.testing.assert_array_equal(same_a, same_b)
    assert not np.array_equal(same_a, fn(image, _seed(7, 10)).numpy())
  views_a = augment.unlabeled_views(image, _seed(3))
  views_b = augment.unlabeled_views(image, _seed(3))
  for a, b in zip(views_a, views_b):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_two_strong_views_differ(rng):
  image = tf.constant(_random_image(rng, 32))
  for s in range(5):
    weak, strong_1, strong_2 = (v.numpy() for v in augment.unlabeled_views(image, _seed(s)))
    assert not np.array_equal(strong_1, strong_2)
    assert not np.array_equal(weak, strong_1)


# ---------------------------------------------------------------------------------------------------------
# Weak view: flip and reflect-pad crop.


def test_horizontal_flip_mirrors_columns():
  image = _gradient_image(8)
  np.testing.assert_array_equal(_run(augment.horizontal_flip, image), image[:, ::-1])


def test_weak_flip_without_padding_happens_about_half_the_time():
  image = _gradient_image(16)
  flipped = 0
  for s in range(100):
    out = _run(augment.weak_augment, image, _seed(s), pad_fraction=0.0)
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 30 <= flipped <= 70


def test_pad_and_crop_matches_numpy_reflect_padding(rng):
  image = _random_image(rng, 16)
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
  for dy in range(5):
    for dx in range(5):
      out = augment.pad_and_crop(tf.constant(image), 2, tf.constant(dy), tf.constant(dx)).numpy()
      np.testing.assert_array_equal(out, padded[dy:dy + 16, dx:dx + 16])
  np.testing.assert_array_equal(
      augment.pad_and_crop(tf.constant(image), 2, tf.constant(2), tf.constant(2)).numpy(), image)


@pytest.mark.parametrize("size,pad", [(16, 2), (32, 4)])
def test_weak_view_is_a_flip_and_a_shift_of_at_most_the_pad(size, pad, rng):
  image = _random_image(rng, size)
  crops = {}
  for flip in (False, True):
    source = image[:, ::-1] if flip else image
    padded = np.pad(source, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    for dy in range(2 * pad + 1):
      for dx in range(2 * pad + 1):
        crops[(flip, dy, dx)] = padded[dy:dy + size, dx:dx + size]
  seen = set()
  for s in range(150):
    out = _run(augment.weak_augment, image, _seed(s))
    matches = [key for key, crop in crops.items() if np.array_equal(out, crop)]
    assert len(matches) == 1
    seen.add(matches[0])
  # Every shift in [-pad, pad] occurs on both axes, and both flip states.
  assert {dy for _, dy, _ in seen} == set(range(2 * pad + 1))
  assert {dx for _, _, dx in seen} == set(range(2 * pad + 1))
  assert {flip for flip, _, _ in seen} == {False, True}


def test_strong_view_applies_each_op_with_probability_one_half(rng):
  # On an image whose channels each span 0..255, an op slot leaves the image unchanged when it is skipped
  # (1/2) or draws Identity, AutoContrast, or TranslateX/Y at level 1 (int(0.03 * 32) = 0 px):
  # P = (1/2 + 1/2 * (2/14 + 2/14 * 1/9))^2 = 0.336 for two slots.
  image = _random_image(rng, 32)
  image[0, 0], image[0, 1] = 0, 255

  def unchanged(index):
    out = augment.strong_augment(tf.constant(image), tf.stack([tf.constant(8, tf.int64), index]),
                                 pad_fraction=0.0, cutout_fraction=0.0)
    return tf.reduce_all(out == image) | tf.reduce_all(out == image[:, ::-1])

  flags = next(iter(tf.data.Dataset.range(400).map(unchanged).batch(400))).numpy()
  assert 0.25 <= flags.mean() <= 0.43


# ---------------------------------------------------------------------------------------------------------
# Cutout.


def test_cutout_blanks_exactly_the_square(rng):
  image = _random_image(rng, 32, 0, 100)
  out = augment.cutout(tf.constant(image), tf.constant(5), tf.constant(9), 16).numpy()
  changed = np.any(out != image, axis=-1)
  expected = np.zeros((32, 32), bool)
  expected[5:21, 9:25] = True
  np.testing.assert_array_equal(changed, expected)
  assert np.all(out[5:21, 9:25] == 127)


def test_cutout_is_clipped_at_the_border(rng):
  image = _random_image(rng, 16, 0, 100)
  out = augment.cutout(tf.constant(image), tf.constant(10), tf.constant(0), 8).numpy()
  expected = image.copy()
  expected[10:16, 0:8] = 127
  np.testing.assert_array_equal(out, expected)


def test_random_cutout_square_side_and_position(rng):
  size, side = 32, 16
  image = _random_image(rng, size, 0, 100)  # no 127 anywhere, so the patch is exactly the changed pixels
  unclipped = 0
  for s in range(60):
    out = _run(augment.random_cutout, image, _seed(s), side)
    rows, cols = np.nonzero(np.any(out != image, axis=-1))
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert rows.size == (bottom - top) * (right - left)  # a filled rectangle
    assert np.all(out[top:bottom, left:right] == 127)
    assert 0 < bottom - top <= side and 0 < right - left <= side
    if top > 0 and bottom < size and left > 0 and right < size:
      unclipped += 1
      assert (bottom - top, right - left) == (side, side)
  assert unclipped > 0


def test_strong_view_contains_a_gray_square(rng):
  image = _random_image(rng, 32, 0, 100)
  out = _run(augment.strong_augment, image, _seed(11), num_ops=0, pad_fraction=0.0)
  gray = np.all(out == 127, axis=-1)
  rows, cols = np.nonzero(gray)
  assert rows.max() - rows.min() + 1 <= 16 and cols.max() - cols.min() + 1 <= 16
  assert gray.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
  flipped = image[:, ::-1]
  assert np.array_equal(out[~gray], image[~gray]) or np.array_equal(out[~gray], flipped[~gray])


# ---------------------------------------------------------------------------------------------------------
# Single ops on hand-made images.


def _all_values_image():
  """32x32 image whose first channel holds 0..255 four times; other channels reversed/shifted."""
  values = np.arange(1024) % 256
  return np.stack([values, 255 - values, (values + 77) % 256], -1).reshape(32, 32, 3).astype(np.uint8)


def test_identity_is_identity(rng):
  image = _random_image(rng, 16)
  np.testing.assert_array_equal(_run(augment.OPS["Identity"], image, 5, _seed(0)), image)


@pytest.mark.parametrize("level,bits", [(1, 4), (2, 4), (3, 5), (4, 5), (5, 6), (6, 6), (7, 6), (8, 7), (9, 7)])
def test_posterize_keeps_top_bits(level, bits):
  image = _all_values_image()
  expected = image & np.uint8((0xFF << (8 - bits)) & 0xFF)
  np.testing.assert_array_equal(_run(augment.OPS["Posterize"], image, level, _seed(0)), expected)


def test_solarize_inverts_at_and_above_threshold():
  image = _all_values_image()
  values = image.astype(int)
  expected = np.where(values >= 100, 255 - values, values).astype(np.uint8)
  np.testing.assert_array_equal(_run(augment.solarize, image, 100), expected)
  # Level 5 -> threshold 256 - int(5 * 25.6) = 128.
  expected_128 = np.where(values >= 128, 255 - values, values).astype(np.uint8)
  np.testing.assert_array_equal(_run(augment.OPS["Solarize"], image, 5, _seed(0)), expected_128)


def test_autocontrast_stretches_each_channel_to_full_range(rng):
  image = np.stack([rng.integers(100, 152, (16, 16)), rng.integers(10, 30, (16, 16)), np.full((16, 16), 90)],
                   -1).astype(np.uint8)
  image[0, 0, 0], image[0, 1, 0] = 100, 151  # channel 0 spans exactly 100..151: 255 / 51 = 5
  out = _run(augment.OPS["AutoContrast"], image, 3, _seed(0))
  np.testing.assert_array_equal(out[..., 0], (image[..., 0].astype(int) - 100) * 5)
  assert out[..., 1].min() == 0 and out[..., 1].max() == 255
  np.testing.assert_array_equal(out[..., 2], image[..., 2])  # a constant channel is left alone


def _equalize_numpy(channel):
  """Histogram equalisation with PIL's look-up-table rule, written as a plain loop."""
  hist = np.bincount(channel.ravel(), minlength=256)
  used = hist[hist > 0]
  if used.size <= 1:
    return channel
  step = (used.sum() - used[-1]) // 255
  if step == 0:
    return channel
  lut, running = [], step // 2
  for count in hist:
    lut.append(min(255, running // step))
    running += count
  return np.asarray(lut, np.uint8)[channel]


def test_equalize_flattens_the_histogram(rng):
  # 16 levels crowded into [0, 16), 256 pixels each: equalising spreads them evenly over [0, 255].
  levels = rng.permutation(np.repeat(np.arange(16), 256)).reshape(64, 64)
  image = np.stack([levels, levels + 100, 3 * levels], -1).astype(np.uint8)
  out = _run(augment.OPS["Equalize"], image, 5, _seed(0))
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], _equalize_numpy(image[..., c]))
    values, counts = np.unique(out[..., c], return_counts=True)
    assert values.size == 16 and np.all(counts == 256)
    assert values[0] == 0 and values[-1] == 255
    assert np.all((np.diff(values) >= 16) & (np.diff(values) <= 18))


def test_equalize_matches_a_numpy_loop(rng):
  crowded = rng.permutation(np.repeat(np.arange(64), 16)).reshape(32, 32)  # saturates at 255 near the top
  skewed = _random_image(rng, 32, 0, 40)
  skewed[..., 2] = np.minimum(skewed[..., 2], 3) * 60
  for image in (np.stack([crowded, crowded * 2, 255 - crowded], -1).astype(np.uint8), skewed,
                np.full((16, 16, 3), 9, np.uint8), _random_image(rng, 16)):
    out = _run(augment.equalize, image)
    for c in range(3):
      np.testing.assert_array_equal(out[..., c], _equalize_numpy(image[..., c]))


@pytest.mark.parametrize("size", [16, 32])
def test_rotate_quarter_turns_match_rot90(size, rng):
  image = _random_image(rng, size)
  np.testing.assert_array_equal(_run(augment.rotate, image, 90.0), np.rot90(image, 1))  # counter-clockwise
  np.testing.assert_array_equal(_run(augment.rotate, image, -90.0), np.rot90(image, -1))
  np.testing.assert_array_equal(_run(augment.rotate, image, 180.0), np.rot90(image, 2))
  np.testing.assert_array_equal(_run(augment.rotate, image, 0.0), image)


def test_rotate_small_angle_fills_corners_black():
  image = np.full((32, 32, 3), 200, np.uint8)
  out = _run(augment.rotate, image, 20.0)
  assert np.all(out[0, 0] == 0) and np.all(out[-1, -1] == 0)
  assert np.all(out[14:18, 14:18] == 200)


def test_translate_shifts_by_the_pixel_count(rng):
  image = _random_image(rng, 16)
  out = _run(augment.translate_x, image, 3)
  np.testing.assert_array_equal(out[:, :13], image[:, 3:])
  assert np.all(out[:, 13:] == 0)
  out = _run(augment.translate_y, image, -2)
  np.testing.assert_array_equal(out[2:], image[:14])
  assert np.all(out[:2] == 0)


def test_translate_op_levels_give_int_of_fraction_times_size(rng):
  image = _random_image(rng, 32)
  # Level 5 -> 0.15 * 32 = 4.8 -> 4 pixels, either direction.
  for s in range(4):
    out = _run(augment.OPS["TranslateX"], image, 5, _seed(s))
    left, right = np.array_equal(out[:, :28], image[:, 4:]), np.array_equal(out[:, 4:], image[:, :28])
    assert left or right
  # Level 1 -> int(0.03 * 32) = 0: no shift at all.
  np.testing.assert_array_equal(_run(augment.OPS["TranslateY"], image, 1, _seed(0)), image)


def test_shear_x_moves_rows_by_factor_times_row(rng):
  image = _random_image(rng, 16)
  out = _run(augment.shear_x, image, 1.0)  # source x = x + y (+ 1 from pixel centres, floored)
  for y in range(16):
    shift = int(np.floor(0.5 + 1.0 * (y + 0.5)))
    valid = 16 - shift
    np.testing.assert_array_equal(out[y, :max(valid, 0)], image[y, shift:])
    assert np.all(out[y, max(valid, 0):] == 0)


def test_enhance_factor_one_is_identity_and_zero_is_the_degenerate_image(rng):
  image = _random_image(rng, 16)
  for fn in (augment.brightness, augment.color, augment.contrast, augment.sharpness):
    np.testing.assert_array_equal(_run(fn, image, 1.0), image)
  np.testing.assert_array_equal(_run(augment.brightness, image, 0.0), np.zeros_like(image))
  gray = _run(augment.color, image, 0.0)
  assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 1] == gray[..., 2])
  flat = _run(augment.contrast, image, 0.0)
  assert np.unique(flat).size == 1


def test_apply_op_indices_follow_the_op_table(rng):
  image = tf.constant(_random_image(rng, 16))
  for index, op in enumerate(augment.OPS.values()):
    np.testing.assert_array_equal(augment.apply_op(image, index, 7, _seed(index)).numpy(),
                                  op(image, 7.0, _seed(index)).numpy())


# ---------------------------------------------------------------------------------------------------------
# Every op against PIL, as the reference applies it.


def _pil_op(name, image, level, sign):
  im = PIL.Image.fromarray(image)
  factor = level * 0.9 / 10 + 0.05
  signed = sign * level * 0.3 / 10
  result = {
      "AutoContrast": lambda: PIL.ImageOps.autocontrast(im),
      "Brightness": lambda: PIL.ImageEnhance.Brightness(im).enhance(factor),
      "Color": lambda: PIL.ImageEnhance.Color(im).enhance(factor),
      "Contrast": lambda: PIL.ImageEnhance.Contrast(im).enhance(factor),
      "Equalize": lambda: PIL.ImageOps.equalize(im),
      "Identity": lambda: im,
      "Posterize": lambda: PIL.ImageOps.posterize(im, int(level * 4 / 10) + 4),
      "Rotate": lambda: im.rotate(sign * int(level * 30 / 10)),
      "Sharpness": lambda: PIL.ImageEnhance.Sharpness(im).enhance(factor),
      "ShearX": lambda: im.transform(im.size, PIL.Image.AFFINE, (1, signed, 0, 0, 1, 0)),
      "ShearY": lambda: im.transform(im.size, PIL.Image.AFFINE, (1, 0, 0, signed, 1, 0)),
      "Solarize": lambda: PIL.ImageOps.solarize(im, 256 - int(level * 256 / 10)),
      "TranslateX": lambda: im.transform(im.size, PIL.Image.AFFINE, (1, 0, int(signed * im.size[0]), 0, 1, 0)),
      "TranslateY": lambda: im.transform(im.size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, int(signed * im.size[1]))),
  }[name]()
  return np.asarray(result)


_SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


@pytest.mark.parametrize("name", list(augment.OPS))
def test_op_matches_pil(name, rng):
  images = [_random_image(rng, 32), _random_image(rng, 32, 70, 140), _gradient_image(32),
            np.clip(rng.normal(128, 30, (32, 32, 3)), 0, 255).astype(np.uint8)]
  signs_seen = set()
  for level in range(1, 10):
    for k, image in enumerate(images):
      out = _run(augment.OPS[name], image, level, _seed(level, k))
      matches = [sign for sign in (1, -1) if np.array_equal(out, _pil_op(name, image, level, sign))]
      assert matches, f"{name} level {level} image {k} differs from PIL"
      if len(matches) == 1:
        signs_seen.add(matches[0])
  if name in _SIGNED_OPS:
    assert signs_seen == {1, -1}


def test_primitives_match_pil_at_other_sizes(rng):
  for size in (16, 64):
    image = _random_image(rng, size)
    im = PIL.Image.fromarray(image)
    np.testing.assert_array_equal(_run(augment.rotate, image, 21.0), np.asarray(im.rotate(21)))
    np.testing.assert_array_equal(_run(augment.shear_y, image, -0.12),
                                  np.asarray(im.transform(im.size, PIL.Image.AFFINE, (1, 0, 0, -0.12, 1, 0))))
    np.testing.assert_array_equal(_run(augment.sharpness, image, 0.5),
                                  np.asarray(PIL.ImageEnhance.Sharpness(im).enhance(0.5)))
    np.testing.assert_array_equal(_run(augment.contrast, image, 1.7),
                                  np.asarray(PIL.ImageEnhance.Contrast(im).enhance(1.7)))


# ---------------------------------------------------------------------------------------------------------
# tf.data (graph mode).


def test_views_trace_into_a_tf_data_map(rng):
  images = np.stack([_random_image(rng, 32) for _ in range(6)])

  def views(index, image):
    seed = tf.stack([tf.constant(5, tf.int64), index])
    return (augment.labeled_view(image, seed), *augment.unlabeled_views(image, seed))

  ds = tf.data.Dataset.from_tensor_slices(images).enumerate().map(views, num_parallel_calls=tf.data.AUTOTUNE)
  first = [tuple(t.numpy() for t in item) for item in ds]
  second = [tuple(t.numpy() for t in item) for item in ds]
  assert len(first) == 6
  for index, (run_1, run_2) in enumerate(zip(first, second)):
    seed = tf.constant([5, index], tf.int64)
    eager = (augment.labeled_view(tf.constant(images[index]), seed),
             *augment.unlabeled_views(tf.constant(images[index]), seed))
    for graph_view, repeat_view, eager_view in zip(run_1, run_2, eager):
      assert graph_view.shape == (32, 32, 3) and graph_view.dtype == np.uint8
      np.testing.assert_array_equal(graph_view, repeat_view)
      np.testing.assert_array_equal(graph_view, eager_view.numpy())


# ---------------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_raise_value_error(rng):
  image = tf.constant(_random_image(rng, 16))
  with pytest.raises(ValueError, match="uint8"):
    augment.weak_augment(tf.cast(image, tf.float32), _seed(0))
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    augment.weak_augment(image[..., :1], _seed(0))
  with pytest.raises(ValueError, match="seed"):
    augment.weak_augment(image, tf.constant([1, 2, 3]))
  with pytest.raises(ValueError, match="magnitude"):
    augment.strong_augment(image, _seed(0), magnitude=11)
  with pytest.raises(ValueError, match="num_ops"):
    augment.unlabeled_views(image, _seed(0), num_ops=-1)
  with pytest.raises(ValueError, match="pad_fraction"):
    augment.labeled_view(image, _seed(0), pad_fraction=1.5)
  with pytest.raises(ValueError, match="cutout_fraction"):
    augment.strong_augment(image, _seed(0), cutout_fraction=2.0)


def test_graph_switch_picks_the_indexed_op_with_and_without_lowering(monkeypatch, rng):
  image = tf.constant(_random_image(rng, 32))
  seed = _seed(4, 2)
  expected = [op(image, 7.0, seed).numpy() for op in augment.OPS.values()]

  def graph_outputs():
    switch = tf.function(lambda index: augment.apply_op(image, index, 7, seed))
    return [switch(tf.constant(index)).numpy() for index in range(len(augment.OPS))]

  for out, want in zip(graph_outputs(), expected):
    np.testing.assert_array_equal(out, want)
  monkeypatch.setattr(augment, "_tf_switch_case", None)  # the public tf.switch_case path
  for out, want in zip(graph_outputs(), expected):
    np.testing.assert_array_equal(out, want)
