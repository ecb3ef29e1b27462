"""Weak and strong image augmentation as TensorFlow ops, for `tf.data.Dataset.map`.

Every function takes a uint8 image [H, W, 3] and returns a uint8 image of the same shape. All randomness is
stateless: each view is a pure function of (image, seed), where `seed` is a shape-[2] int32/int64 tensor, so a
pipeline that derives the seed from (run seed, epoch, example index) replays exactly after a restart.

Views (FixMatch, as used by SeMi):
- weak: horizontal flip (p=0.5), reflect-pad by int(size * pad_fraction) pixels, random crop back to size.
- strong: the weak transform, then RandAugmentMC(n=num_ops, m=magnitude): `num_ops` ops drawn uniformly with
  replacement from the 14 ops of `OPS`, each with an integer level v in [1, magnitude) and applied with
  probability 0.5; then Cutout of a gray (127) square of side int(size * cutout_fraction).

The ops reproduce PIL's arithmetic (ImageOps / ImageEnhance / Image.transform), which the PyTorch reference
applies to PIL images: nearest-neighbour sampling at pixel centres, black (0) fill outside the image (the
reference passes no fill colour, so PIL's default applies), float32 blends truncated to uint8, ITU-R 601
integer luma. One deliberate difference: PIL's `ImageDraw.rectangle` includes both corners, so the
reference's Cutout blanks a (side + 1)-pixel square; here the square has exactly the stated side.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

try:  # Private: only used to keep the op switch unlowered (see _switch_case).
  from tensorflow.python.ops import control_flow_switch_case as _tf_switch_case
except ImportError:
  _tf_switch_case = None

CUTOUT_GRAY = 127
# PIL fills pixels that map outside the source with the image default colour, black.
AFFINE_FILL = 0
# Levels v are on RandAugment's 0..10 scale (the reference's PARAMETER_MAX).
MAX_LEVEL = 10

_SMOOTH_CENTRE_WEIGHT = 5  # PIL's ImageFilter.SMOOTH: 3x3 ones with 5 at the centre, divided by 13.
_SMOOTH_DIVISOR = 13


# The views hold no tensor-dependent Python control flow; keeping AutoGraph (which tf.data.Dataset.map applies
# to the mapped function and everything it calls) out of them cuts tracing time severalfold.
_not_autograph = tf.autograph.experimental.do_not_convert

# ----------------------------------------------------------------------------------------------------------
# Input checks.


def _check_image(image: tf.Tensor) -> tuple[int, int]:
  """Returns the static (height, width) of a uint8 [H, W, 3] image, or raises ValueError."""
  if image.dtype != tf.uint8:
    raise ValueError(f"augment expects uint8 images, got {image.dtype.name}; cast with tf.cast(image, tf.uint8) "
                     "before augmenting and normalise after.")
  shape = image.shape
  if shape.rank != 3 or shape[-1] != 3:
    raise ValueError(f"augment expects one RGB image of shape [H, W, 3], got {shape}; map over single "
                     "examples (before .batch) and convert grayscale images to 3 channels.")
  height, width = shape[0], shape[1]
  if height is None or width is None:
    raise ValueError(f"augment needs a static image size, got {shape}; call image.set_shape([H, W, 3]) "
                     "or tf.ensure_shape before mapping.")
  if min(height, width) < 3:
    raise ValueError(f"augment needs images of at least 3x3 pixels (the sharpness filter is 3x3), got {shape}.")
  return height, width


def _check_seed(seed) -> tf.Tensor:
  """Returns the seed as an int64 [2] tensor, or raises ValueError."""
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or (seed.shape.rank is not None and seed.shape != (2,)):
    raise ValueError(f"seed must be a shape-[2] int32/int64 tensor, got {seed.dtype.name} {seed.shape}; "
                     "derive one per example, e.g. tf.stack([run_seed, example_index]).")
  # stateless_split draws its keys in the seed's dtype; one dtype makes int32 and int64 seeds equivalent.
  return tf.cast(seed, tf.int64)


def _pad_pixels(height: int, width: int, pad_fraction: float) -> int:
  if pad_fraction < 0:
    raise ValueError(f"pad_fraction must be >= 0, got {pad_fraction}.")
  pad = int(min(height, width) * pad_fraction)
  if pad >= min(height, width):
    raise ValueError(f"pad_fraction={pad_fraction} gives a reflect pad of {pad} px, which must be smaller "
                     f"than the image side {min(height, width)}; use a pad_fraction below 1.")
  return pad


def _check_strong_config(num_ops: int, magnitude: int, cutout_fraction: float) -> None:
  if not isinstance(num_ops, int) or num_ops < 0:
    raise ValueError(f"num_ops must be a non-negative int, got {num_ops!r}.")
  if not isinstance(magnitude, int) or not 2 <= magnitude <= MAX_LEVEL:
    raise ValueError(f"magnitude must be an int in [2, {MAX_LEVEL}] (levels are drawn from [1, magnitude)), "
                     f"got {magnitude!r}.")
  if not 0.0 <= cutout_fraction <= 1.0:
    raise ValueError(f"cutout_fraction must be in [0, 1], got {cutout_fraction}.")


# ----------------------------------------------------------------------------------------------------------
# Geometric primitives.


def horizontal_flip(image: tf.Tensor) -> tf.Tensor:
  """Mirrors the image left-right."""
  return image[:, ::-1, :]


def pad_and_crop(image: tf.Tensor, pad: int, offset_y: tf.Tensor, offset_x: tf.Tensor) -> tf.Tensor:
  """Reflect-pads by `pad` pixels on every side and crops the original size at (offset_y, offset_x).

  Offsets lie in [0, 2 * pad]; (pad, pad) gives back the input. Reflect mode does not repeat the edge
  pixel, like torchvision's padding_mode='reflect'.
  """
  height, width = _check_image(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  crop = tf.slice(padded, tf.stack([offset_y, offset_x, 0]), [height, width, 3])
  return tf.ensure_shape(crop, [height, width, 3])


def affine_nearest(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """PIL's AFFINE transform with NEAREST resampling (what `Image.transform` and `Image.rotate` default to).

  `matrix` = (a, b, c, d, e, f) maps each output pixel centre (x + 0.5, y + 0.5) to the source point
  (a x + b y + c, d x + e y + f) and takes the pixel that contains it; points outside the image give
  AFFINE_FILL. PIL evaluates this in 16.16 fixed point, which rounds the matrix to 1/65536 and decides
  exact ties (source points on a pixel edge) its own way; the same integer arithmetic here gives PIL's
  pixels bit for bit.
  """
  height, width = _check_image(image)
  rows = tf.reshape(tf.cast(matrix, tf.float64), [2, 3])  # (a, b, c) for x, (d, e, f) for y
  # Source of the first pixel's centre, summed in PIL's order: c + b / 2 + a / 2.
  start = rows[:, 2] + rows[:, 1] * 0.5 + rows[:, 0] * 0.5
  fixed = tf.cast(tf.floor(tf.concat([rows[:, :2], start[:, None]], axis=1) * 65536.0 + 0.5), tf.int64)
  grid_x, grid_y = _pixel_grid(height, width)
  # [2, H, W]: source (x, y) of every output pixel; // floors, also below zero, like PIL's >> 16.
  fixed = fixed[:, :, None, None]
  source = (fixed[:, 2] + fixed[:, 0] * grid_x + fixed[:, 1] * grid_y) // 65536
  size = tf.constant([width, height], tf.int64)[:, None, None]
  inside = tf.reduce_all((source >= 0) & (source < size), axis=0)
  indices = tf.transpose(tf.clip_by_value(source, 0, size - 1)[::-1], [1, 2, 0])  # [H, W, (y, x)]
  sampled = tf.gather_nd(image, indices)
  return tf.where(inside[..., None], sampled, tf.constant(AFFINE_FILL, tf.uint8))


def _pixel_grid(height: int, width: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Column and row index of every pixel, int64 [H, W] each, as graph constants."""
  grid_y, grid_x = np.meshgrid(np.arange(height, dtype=np.int64), np.arange(width, dtype=np.int64),
                               indexing="ij")
  return tf.constant(grid_x), tf.constant(grid_y)


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates counter-clockwise by `degrees` about the image centre (PIL `Image.rotate`, no expand)."""
  height, width = _check_image(image)
  theta = -(tf.cast(degrees, tf.float64) * (math.pi / 180.0))
  cos, sin = tf.cos(theta), tf.sin(theta)
  centre_x, centre_y = width / 2.0, height / 2.0
  # Source = R (output - centre) + centre as one affine matrix, summed in PIL's order.
  matrix = tf.stack([cos, sin, cos * -centre_x + sin * -centre_y + centre_x,
                     -sin, cos, -sin * -centre_x + cos * -centre_y + centre_y])
  return affine_nearest(image, matrix)


def _affine(image: tf.Tensor, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> tf.Tensor:
  """PIL's affine (a, b, c, d, e, f): source x = a x + b y + c, source y = d x + e y + f."""
  return affine_nearest(image, tf.stack([tf.cast(v, tf.float64) for v in (a, b, c, d, e, f)]))


def shear_x(image: tf.Tensor, factor) -> tf.Tensor:
  """Source x = x + factor * y (PIL affine (1, factor, 0, 0, 1, 0)); shears about the top-left corner."""
  return _affine(image, b=factor)


def shear_y(image: tf.Tensor, factor) -> tf.Tensor:
  """Source y = factor * x + y (PIL affine (1, 0, 0, factor, 1, 0))."""
  return _affine(image, d=factor)


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """out[:, x] = in[:, x + pixels] (PIL's sign convention: positive moves the content left)."""
  return _affine(image, c=pixels)


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """out[y, :] = in[y + pixels, :] (positive moves the content up)."""
  return _affine(image, f=pixels)


def cutout(image: tf.Tensor, top: tf.Tensor, left: tf.Tensor, side: int) -> tf.Tensor:
  """Paints rows [top, top + side) x columns [left, left + side), clipped to the image, with CUTOUT_GRAY."""
  height, width = _check_image(image)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
  return tf.where(inside[..., None], tf.constant(CUTOUT_GRAY, tf.uint8), image)


# ----------------------------------------------------------------------------------------------------------
# Colour primitives.


def identity(image: tf.Tensor) -> tf.Tensor:
  return image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the top `bits` bits of every channel value (PIL `ImageOps.posterize`)."""
  bits = tf.cast(bits, tf.int32)
  keep_mask = tf.cast(255 - (tf.bitwise.left_shift(1, 8 - bits) - 1), tf.uint8)
  return tf.bitwise.bitwise_and(image, keep_mask)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts (255 - value) every value >= threshold (PIL `ImageOps.solarize`)."""
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.where(values < tf.cast(threshold, tf.int32), values, 255 - values), tf.uint8)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Per channel, maps [min, max] linearly onto [0, 255] (PIL `ImageOps.autocontrast`, cutoff 0).

  Uses PIL's float64 formula int(v * scale - lo * scale) so results match it to the bit; a constant
  channel is left as is.
  """
  values = tf.cast(image, tf.float64)
  low = tf.reduce_min(values, axis=[0, 1])
  high = tf.reduce_max(values, axis=[0, 1])
  spread = high > low
  scale = 255.0 / tf.where(spread, high - low, 1.0)
  offset = -low * scale
  stretched = tf.clip_by_value(tf.cast(values * scale + offset, tf.int32), 0, 255)
  return tf.where(spread, tf.cast(stretched, tf.uint8), image)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalisation with PIL's integer look-up table (`ImageOps.equalize`).

  lut[i] = (step // 2 + #pixels below i) // step with step = (#pixels - #pixels at the top value) // 255;
  a channel with one value, or with step 0, is left as is.
  """
  height, width = _check_image(image)
  num_pixels = height * width
  channels = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [num_pixels, 3]))  # [3, HW]
  channel_offsets = 256 * tf.range(3)[:, None]
  histogram = tf.reshape(tf.math.bincount(tf.reshape(channels + channel_offsets, [-1]), minlength=768,
                                          maxlength=768), [3, 256])
  top_count = tf.reduce_sum(tf.cast(channels == tf.reduce_max(channels, axis=1, keepdims=True), tf.int32),
                            axis=1)
  step = (num_pixels - top_count) // 255
  distinct_values = tf.math.count_nonzero(histogram, axis=1)
  changes = (distinct_values > 1) & (step > 0)
  safe_step = tf.maximum(step, 1)[:, None]
  below = tf.math.cumsum(histogram, axis=1, exclusive=True)
  lut = tf.minimum((safe_step // 2 + below) // safe_step, 255)
  lut = tf.where(changes[:, None], lut, tf.range(256)[None, :])
  equalized = tf.gather(tf.reshape(lut, [-1]), channels + channel_offsets)  # [3, HW]
  return tf.reshape(tf.cast(tf.transpose(equalized), tf.uint8), [height, width, 3])


def luma(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L conversion, (19595 R + 38470 G + 7471 B + 2^15) >> 16, as int32 [H, W]."""
  values = tf.cast(image, tf.int32)
  return tf.bitwise.right_shift(
      values[..., 0] * 19595 + values[..., 1] * 38470 + values[..., 2] * 7471 + 32768, 16)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL's `Image.blend(degenerate, image, factor)`: float32 interpolation (or extrapolation), clipped and
  truncated to uint8. factor 1 returns `image`, 0 returns `degenerate`."""
  factor = tf.cast(factor, tf.float32)
  start = tf.cast(degenerate, tf.float32)
  mixed = start + factor * (tf.cast(image, tf.float32) - start)
  return tf.cast(tf.floor(tf.clip_by_value(mixed, 0.0, 255.0)), tf.uint8)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with black (PIL `ImageEnhance.Brightness`)."""
  return blend(tf.zeros_like(image), image, factor)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with the image's grayscale version (PIL `ImageEnhance.Color`)."""
  gray = tf.cast(tf.repeat(luma(image)[..., None], 3, axis=-1), tf.uint8)
  return blend(gray, image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with a flat image at the rounded mean luma (PIL `ImageEnhance.Contrast`)."""
  mean_luma = tf.floor(tf.reduce_mean(tf.cast(luma(image), tf.float64)) + 0.5)
  flat = tf.fill(tf.shape(image), tf.cast(mean_luma, tf.uint8))
  return blend(flat, image, factor)


def smooth(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageFilter.SMOOTH: 3x3 weights 1 (centre 5) / 13, rounded; the one-pixel border is copied."""
  height, width = _check_image(image)
  values = tf.cast(image, tf.int32)
  window_sum = tf.add_n([values[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3)])
  weighted = window_sum + (_SMOOTH_CENTRE_WEIGHT - 1) * values[1:-1, 1:-1]
  # round(weighted / 13); never a tie since 13 is odd.
  interior = (2 * weighted + _SMOOTH_DIVISOR) // (2 * _SMOOTH_DIVISOR)
  smoothed = tf.pad(interior, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros([height - 2, width - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]], constant_values=True)
  return tf.cast(tf.where(border, values, smoothed), tf.uint8)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with the smoothed image (PIL `ImageEnhance.Sharpness`): factor < 1 blurs, > 1 sharpens."""
  return blend(smooth(image), image, factor)


# ----------------------------------------------------------------------------------------------------------
# RandAugment op table: level v (RandAugment scale 0..10) -> op parameter, as FixMatch's RandAugmentMC pool.


def _float_level(level, max_value: float, bias: float = 0.0) -> tf.Tensor:
  """float(v) * max_value / 10 + bias, in float64 like the Python original."""
  return tf.cast(level, tf.float64) * max_value / MAX_LEVEL + bias


def _int_level(level, max_value: int) -> tf.Tensor:
  """int(v * max_value / 10) for v >= 0."""
  return tf.cast(tf.floor(tf.cast(level, tf.float64) * max_value / MAX_LEVEL), tf.int32)


def _random_sign(value: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Negates `value` with probability 0.5."""
  negate = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(negate, -value, value)


def _autocontrast_op(image, level, seed):
  del level, seed
  return autocontrast(image)


def _brightness_op(image, level, seed):
  del seed
  return brightness(image, _float_level(level, 0.9, 0.05))


def _color_op(image, level, seed):
  del seed
  return color(image, _float_level(level, 0.9, 0.05))


def _contrast_op(image, level, seed):
  del seed
  return contrast(image, _float_level(level, 0.9, 0.05))


def _equalize_op(image, level, seed):
  del level, seed
  return equalize(image)


def _identity_op(image, level, seed):
  del level, seed
  return identity(image)


def _posterize_op(image, level, seed):
  del seed
  return posterize(image, _int_level(level, 4) + 4)


def _rotate_op(image, level, seed):
  return rotate(image, _random_sign(tf.cast(_int_level(level, 30), tf.float64), seed))


def _sharpness_op(image, level, seed):
  del seed
  return sharpness(image, _float_level(level, 0.9, 0.05))


def _shear_x_op(image, level, seed):
  return shear_x(image, _random_sign(_float_level(level, 0.3), seed))


def _shear_y_op(image, level, seed):
  return shear_y(image, _random_sign(_float_level(level, 0.3), seed))


def _solarize_op(image, level, seed):
  del seed
  return solarize(image, 256 - _int_level(level, 256))


def _translate_x_op(image, level, seed):
  _, width = _check_image(image)
  # int() of the signed fraction times the width: truncates toward zero, like the original.
  pixels = tf.cast(_random_sign(_float_level(level, 0.3), seed) * width, tf.int32)
  return translate_x(image, pixels)


def _translate_y_op(image, level, seed):
  height, _ = _check_image(image)
  pixels = tf.cast(_random_sign(_float_level(level, 0.3), seed) * height, tf.int32)
  return translate_y(image, pixels)


# Name -> op(image uint8 [H, W, 3], level v, seed [2]) -> uint8 image. The order fixes the op indices that
# strong_augment draws. Ops without a random sign ignore the seed.
OPS: dict[str, Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "AutoContrast": _autocontrast_op,
    "Brightness": _brightness_op,
    "Color": _color_op,
    "Contrast": _contrast_op,
    "Equalize": _equalize_op,
    "Identity": _identity_op,
    "Posterize": _posterize_op,
    "Rotate": _rotate_op,
    "Sharpness": _sharpness_op,
    "ShearX": _shear_x_op,
    "ShearY": _shear_y_op,
    "Solarize": _solarize_op,
    "TranslateX": _translate_x_op,
    "TranslateY": _translate_y_op,
}
_IDENTITY_INDEX = list(OPS).index("Identity")
# The switch branches call these: each op body is traced once per image shape instead of once per switch,
# which makes building a pipeline several times faster at no cost per example.
_TRACED_OPS = tuple(tf.function(op, autograph=False) for op in OPS.values())


@_not_autograph
def apply_op(image: tf.Tensor, op_index, level, seed) -> tf.Tensor:
  """Applies the op at position `op_index` of OPS with level `level`; `op_index` may be a traced tensor."""
  height, width = _check_image(image)
  seed = _check_seed(seed)
  level = tf.cast(level, tf.float64)
  branches = [lambda op=op: op(image, level, seed) for op in _TRACED_OPS]
  result = _switch_case(tf.cast(op_index, tf.int32), branches)
  return tf.ensure_shape(result, [height, width, 3])


def _switch_case(index: tf.Tensor, branches: list) -> tf.Tensor:
  """`tf.switch_case(index, branches)` whose Case op is kept as a function call that runs one branch.

  In a graph, TF lowers Case to Switch/Merge nodes by default, and every call then pushes dead tensors
  through all nodes of all untaken branches: with the 14 ops that made a strong view about 1.5x slower
  under tf.data. `tf.switch_case` has no flag for it; TF's own helper behind it takes
  lower_using_switch_merge (its `execute_fn_for_device` passes False). Should a TF release move the
  helper, the public op gives the same results, only slower.
  """
  helper = getattr(_tf_switch_case, "_indexed_case_helper", None)
  if helper is None:
    return tf.switch_case(index, branches)
  return helper(branches, None, index, "switch_case", lower_using_switch_merge=False)


# ----------------------------------------------------------------------------------------------------------
# Views.


@_not_autograph
def weak_augment(image: tf.Tensor, seed, pad_fraction: float = 0.125) -> tf.Tensor:
  """Random horizontal flip (p=0.5), reflect-pad by int(size * pad_fraction) px, random crop to size."""
  height, width = _check_image(image)
  seed = _check_seed(seed)
  pad = _pad_pixels(height, width, pad_fraction)
  flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  image = tf.where(flip, horizontal_flip(image), image)
  if pad == 0:
    return image
  offset_y, offset_x = tf.unstack(
      tf.random.stateless_uniform([2], crop_seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32))
  return pad_and_crop(image, pad, offset_y, offset_x)


@_not_autograph
def random_cutout(image: tf.Tensor, seed, side: int) -> tf.Tensor:
  """Cutout of a `side` square around a uniformly drawn centre, clipped at the borders (as CutoutAbs)."""
  height, width = _check_image(image)
  seed = _check_seed(seed)
  if side <= 0:
    return image
  centre = tf.random.stateless_uniform([2], seed, dtype=tf.float64) * tf.constant([height, width], tf.float64)
  corner = tf.cast(tf.floor(tf.maximum(centre - side / 2.0, 0.0)), tf.int32)
  return cutout(image, corner[0], corner[1], side)


@_not_autograph
def strong_augment(image: tf.Tensor, seed, num_ops: int = 2, magnitude: int = 10, cutout_fraction: float = 0.5,
                   pad_fraction: float = 0.125) -> tf.Tensor:
  """Weak transform, then RandAugmentMC(num_ops, magnitude), then Cutout (see the module docstring)."""
  height, width = _check_image(image)
  seed = _check_seed(seed)
  _check_strong_config(num_ops, magnitude, cutout_fraction)
  keys = tf.random.experimental.stateless_split(seed, 5 + num_ops)
  image = weak_augment(image, keys[0], pad_fraction)
  if num_ops:
    op_indices = tf.random.stateless_uniform([num_ops], keys[1], minval=0, maxval=len(OPS), dtype=tf.int32)
    levels = tf.random.stateless_uniform([num_ops], keys[2], minval=1, maxval=magnitude, dtype=tf.int32)
    applied = tf.random.stateless_uniform([num_ops], keys[3]) < 0.5
    # A skipped op is Identity.
    op_indices = tf.where(applied, op_indices, _IDENTITY_INDEX)
    for i in range(num_ops):
      image = apply_op(image, op_indices[i], levels[i], keys[5 + i])
  side = int(min(height, width) * cutout_fraction)
  return random_cutout(image, keys[4], side)


@_not_autograph
def labeled_view(image: tf.Tensor, seed, *, pad_fraction: float = 0.125, num_ops: int = 2, magnitude: int = 10,
                 cutout_fraction: float = 0.5) -> tf.Tensor:
  """The weak view of a labeled example.

  Takes the same keywords as `unlabeled_views`, so one augmentation config serves both streams; only
  `pad_fraction` affects the weak view (the others are still checked).
  """
  _check_strong_config(num_ops, magnitude, cutout_fraction)
  return weak_augment(image, seed, pad_fraction)


@_not_autograph
def unlabeled_views(image: tf.Tensor, seed, *, pad_fraction: float = 0.125, num_ops: int = 2, magnitude: int = 10,
                    cutout_fraction: float = 0.5) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(weak, strong_1, strong_2): one weak and two independently drawn strong views of one example."""
  seed = _check_seed(seed)
  weak_seed, strong_seed_1, strong_seed_2 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  strong_kwargs = dict(num_ops=num_ops, magnitude=magnitude, cutout_fraction=cutout_fraction,
                       pad_fraction=pad_fraction)
  return (weak_augment(image, weak_seed, pad_fraction),
          strong_augment(image, strong_seed_1, **strong_kwargs),
          strong_augment(image, strong_seed_2, **strong_kwargs))
