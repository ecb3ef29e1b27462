"""Weak and strong views made on the accelerator, inside the jitted train step (`data.augment_on`).

The same augmentation as `augment` (the tf.data path): the same 14 ops in the same order, the same mapping from
RandAugment level to op parameter, the same PIL arithmetic, FixMatch's views (weak: flip + reflect-pad-and-crop;
strong: weak, then RandAugmentMC(num_ops, magnitude) with each op applied with probability 0.5 and a random sign
for the signed ops, then a gray Cutout square). Images are uint8 [H, W, 3]; every function of one image is pure
and vmapped over the batch.

Randomness: the key of the example at global position `pos` of a stream is fold_in(fold_in(root, stream), pos),
with root = fold_in(the run's step key, _AUGMENT_TAG). A view is a function of (seed, stream, position) only: a
resumed run makes the same views, and neither the device count nor the example's row in the batch changes them.
The draws differ from the host path's (another generator), their distributions do not.

Op choice without branches: under vmap `lax.switch` evaluates all 14 ops for every image and selects. Here the ops
fall into three families that share their costly part, so each op slot costs three passes instead of fourteen:
  * geometric (Identity, Rotate, ShearX/Y, TranslateX/Y): one nearest-neighbour affine gather, its matrix taken
    from a table indexed by (op, sign, level), in PIL's 16.16 fixed point (the identity matrix for the others);
  * blends (Brightness, Color, Contrast, Sharpness): PIL's blend of the image with a degenerate image (black,
    gray, flat mean luma, smoothed), picked by op, at the factor of the level;
  * look-up tables (AutoContrast, Equalize, Posterize, Solarize): a per-channel table over the 256 values.
The level -> parameter tables are computed once per image size in float64 on the host, with the expressions and
the operation order of `augment`, so integer parameters and fixed-point matrices equal the host's bit for bit;
blends and AutoContrast run in float32 (the host: float64 for AutoContrast), which moves a value by at most one
intensity level.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

PLACES = ("host", "device", "auto")  # the values of data.augment_on
GPU_PLATFORMS = ("gpu", "cuda", "rocm")

# The op table of `augment.OPS`, in its order (the op indices drawn); tests pin the two together.
OP_NAMES = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize", "Rotate",
            "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
IDENTITY = OP_NAMES.index("Identity")
MAX_LEVEL = 10  # RandAugment's level scale, as augment.MAX_LEVEL
CUTOUT_GRAY = 127  # as augment.CUTOUT_GRAY
AFFINE_FILL = 0  # as augment.AFFINE_FILL: PIL's default fill outside the source image
LABELED_STREAM, UNLABELED_STREAM = 1, 2
# Folded into the run's step key for the augmentation root: above every step number (an int32), so the root is
# never the dropout key fold_in(step key, step).
_AUGMENT_TAG = np.uint32(2**31 + 19)

_GEOMETRIC, _BLEND, _TABLE = 0, 1, 2
_FAMILY = np.array([_TABLE, _BLEND, _BLEND, _BLEND, _TABLE, _GEOMETRIC, _TABLE, _GEOMETRIC, _BLEND, _GEOMETRIC,
                    _GEOMETRIC, _TABLE, _GEOMETRIC, _GEOMETRIC], np.int32)
# Degenerate image of each blend op: 0 black (Brightness), 1 gray (Color), 2 flat mean luma (Contrast),
# 3 smoothed (Sharpness); look-up table of each table op: 0 AutoContrast, 1 Equalize, 2 Posterize, 3 Solarize.
_MEMBER = np.array([0, 0, 1, 2, 1, 0, 2, 0, 3, 0, 0, 3, 0, 0], np.int32)
_SMOOTH_CENTRE_WEIGHT, _SMOOTH_DIVISOR = 5, 13  # PIL's ImageFilter.SMOOTH, as in augment
_FIXED_ONE = 65536  # PIL's 16.16 fixed point


@dataclasses.dataclass(frozen=True)
class Settings:
  """The augmentation of a run (the `data` config fields of the same names)."""
  pad_fraction: float = 0.125
  num_ops: int = 2
  magnitude: int = 10
  cutout_fraction: float = 0.5

  def __post_init__(self):
    if not self.pad_fraction >= 0:
      raise ValueError(f"pad_fraction must be >= 0, got {self.pad_fraction}.")
    if not isinstance(self.num_ops, int) or self.num_ops < 0:
      raise ValueError(f"num_ops must be a non-negative int, got {self.num_ops!r}.")
    if not isinstance(self.magnitude, int) or not 2 <= self.magnitude <= MAX_LEVEL:
      raise ValueError(f"magnitude must be an int in [2, {MAX_LEVEL}] (levels are drawn from [1, magnitude)), "
                       f"got {self.magnitude!r}.")
    if not 0.0 <= self.cutout_fraction <= 1.0:
      raise ValueError(f"cutout_fraction must be in [0, 1], got {self.cutout_fraction}.")

  @classmethod
  def from_config(cls, data_config) -> Settings:
    d = data_config
    return cls(pad_fraction=float(d.pad_fraction), num_ops=int(d.randaugment_ops),
               magnitude=int(d.randaugment_magnitude), cutout_fraction=float(d.cutout_fraction))

  def pad(self, height: int, width: int) -> int:
    pad = int(min(height, width) * self.pad_fraction)
    if pad >= min(height, width):
      raise ValueError(f"pad_fraction={self.pad_fraction} gives a reflect pad of {pad} px, which must be smaller "
                       f"than the image side {min(height, width)}; use a pad_fraction below 1.")
    return pad

  def cutout_side(self, height: int, width: int) -> int:
    return int(min(height, width) * self.cutout_fraction)


def runs_on_device(setting: str, platforms) -> bool:
  """Whether `data.augment_on=setting` makes the views in the train step for a run on `platforms`.

  auto: on GPUs, whose hosts have few CPU cores per chip; elsewhere tf.data on the host, which overlaps with the
  step: on CPUs the views cost a few percent of the step either way and CPU runs keep the tf.data views the
  golden tests pin; TPU hosts have many cores per chip, and per-pixel gathers are slow on TPUs (docs/data.md,
  "Where augmentation runs").
  """
  if setting not in PLACES:
    raise ValueError(f"data.augment_on must be one of {PLACES}, got {setting!r}.")
  if setting != "auto":
    return setting == "device"
  platforms = set(platforms)
  return bool(platforms) and platforms <= set(GPU_PLATFORMS)


# ----------------------------------------------------------------------------------------------------------
# Level -> parameter tables, in float64 with the host's expressions (augment._float_level / _int_level).


def _float_level(level: int, max_value: float, bias: float = 0.0) -> float:
  return float(level) * max_value / MAX_LEVEL + bias


def _int_level(level: int, max_value: int) -> int:
  return int(math.floor(float(level) * max_value / MAX_LEVEL))


_LEVELS = range(MAX_LEVEL + 1)
ENHANCE_FACTORS = np.array([_float_level(v, 0.9, 0.05) for v in _LEVELS], np.float64)
POSTERIZE_BITS = np.array([_int_level(v, 4) + 4 for v in _LEVELS], np.int32)
SOLARIZE_THRESHOLDS = np.array([256 - _int_level(v, 256) for v in _LEVELS], np.int32)


def _fixed_point(a, b, c, d, e, f) -> list[int]:
  """PIL's affine matrix in 16.16 fixed point, as augment.affine_nearest rounds it: per row (x then y) the two
  coefficients and the source of the first pixel centre, start = c + b / 2 + a / 2."""
  fixed = []
  for row in ((a, b, c), (d, e, f)):
    start = row[2] + row[1] * 0.5 + row[0] * 0.5
    fixed += [math.floor(v * 65536.0 + 0.5) for v in (row[0], row[1], start)]
  return fixed


def _affine_of(name: str, level: int, negate: bool, height: int, width: int) -> list[int]:
  """The fixed-point matrix of op `name` at `level` with the random sign `negate` (augment's _*_op)."""
  sign = -1.0 if negate else 1.0
  if name == "Rotate":
    degrees = sign * float(_int_level(level, 30))
    theta = -(degrees * (math.pi / 180.0))
    cos, sin = math.cos(theta), math.sin(theta)
    centre_x, centre_y = width / 2.0, height / 2.0
    return _fixed_point(cos, sin, cos * -centre_x + sin * -centre_y + centre_x,
                        -sin, cos, -sin * -centre_x + cos * -centre_y + centre_y)
  if name == "ShearX":
    return _fixed_point(1.0, sign * _float_level(level, 0.3), 0.0, 0.0, 1.0, 0.0)
  if name == "ShearY":
    return _fixed_point(1.0, 0.0, 0.0, sign * _float_level(level, 0.3), 1.0, 0.0)
  if name == "TranslateX":  # int() of the signed fraction times the side truncates toward zero, as on the host
    return _fixed_point(1.0, 0.0, float(int(sign * _float_level(level, 0.3) * width)), 0.0, 1.0, 0.0)
  if name == "TranslateY":
    return _fixed_point(1.0, 0.0, 0.0, 0.0, 1.0, float(int(sign * _float_level(level, 0.3) * height)))
  return _fixed_point(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # every other op: the identity


@functools.lru_cache(maxsize=None)
def affine_table(height: int, width: int) -> np.ndarray:
  """int32 [14 ops, 2 signs (negate), 11 levels, 6]: the fixed-point matrix of every (op, sign, level)."""
  table = np.array([[[_affine_of(name, v, negate, height, width) for v in _LEVELS] for negate in (False, True)]
                    for name in OP_NAMES], np.int64)
  # Sources are computed in int32: |coefficients| * side + |start| must stay below 2^31.
  bound = np.abs(table[..., [0, 3]]) * width + np.abs(table[..., [1, 4]]) * height + np.abs(table[..., [2, 5]])
  if bound.max() >= 2**31:
    raise ValueError(f"device augmentation supports images up to about 8000 px a side, got {height}x{width}; "
                     "set data.augment_on=host.")
  return table.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# One image: primitives.


def _as_image(image) -> tuple[jax.Array, int, int]:
  """(image as a jax array, height, width), or ValueError unless a uint8 [H, W, 3] image of at least 3x3."""
  image = jnp.asarray(image)
  if image.dtype != jnp.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"device augmentation expects one uint8 RGB image [H, W, 3] (vmap over the batch), got "
                     f"{image.dtype} {image.shape}.")
  if min(image.shape[:2]) < 3:
    raise ValueError(f"device augmentation needs images of at least 3x3 pixels, got {image.shape}.")
  return image, image.shape[0], image.shape[1]


def flip_and_crop(image: jax.Array, flip, offset_y, offset_x, pad: int) -> jax.Array:
  """Mirrors left-right where `flip`, reflect-pads by `pad` and crops the original size at (offset_y, offset_x)
  (augment.weak_augment's transform as one gather: offsets in [0, 2 * pad], reflection without edge repeat)."""
  image, height, width = _as_image(image)

  def reflect(index, size):
    index = jnp.abs(index)
    return jnp.where(index >= size, 2 * (size - 1) - index, index)

  rows = reflect(jnp.arange(height) + offset_y - pad, height)
  cols = reflect(jnp.arange(width) + offset_x - pad, width)
  cols = jnp.where(flip, width - 1 - cols, cols)
  return image[rows[:, None], cols[None, :]]


def affine_fixed(image: jax.Array, fixed) -> jax.Array:
  """PIL's AFFINE transform with NEAREST resampling from a 16.16 fixed-point matrix (a, b, start_x, d, e,
  start_y) as `affine_table` holds it: output pixel (x, y) takes source pixel ((start_x + a x + b y) >> 16,
  (start_y + d x + e y) >> 16), AFFINE_FILL outside the image (augment.affine_nearest's integer arithmetic)."""
  image, height, width = _as_image(image)
  fixed = jnp.asarray(fixed, jnp.int32)
  grid_x = jnp.arange(width, dtype=jnp.int32)[None, :]
  grid_y = jnp.arange(height, dtype=jnp.int32)[:, None]
  # >> on int32 is an arithmetic shift: it floors below zero too, like PIL.
  source_x = (fixed[2] + fixed[0] * grid_x + fixed[1] * grid_y) >> 16
  source_y = (fixed[5] + fixed[3] * grid_x + fixed[4] * grid_y) >> 16
  inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
  sampled = image[jnp.clip(source_y, 0, height - 1), jnp.clip(source_x, 0, width - 1)]
  return jnp.where(inside[..., None], sampled, jnp.uint8(AFFINE_FILL))


def luma(image: jax.Array) -> jax.Array:
  """PIL's RGB -> L, (19595 R + 38470 G + 7471 B + 2^15) >> 16, int32 [H, W]."""
  v = jnp.asarray(image).astype(jnp.int32)
  return (v[..., 0] * 19595 + v[..., 1] * 38470 + v[..., 2] * 7471 + 32768) >> 16


def blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
  """PIL's Image.blend(degenerate, image, factor) in float32, clipped and truncated to uint8."""
  start = jnp.asarray(degenerate).astype(jnp.float32)
  mixed = start + jnp.asarray(factor, jnp.float32) * (jnp.asarray(image).astype(jnp.float32) - start)
  return jnp.floor(jnp.clip(mixed, 0.0, 255.0)).astype(jnp.uint8)


def smooth(image: jax.Array) -> jax.Array:
  """PIL's ImageFilter.SMOOTH (3x3 ones, centre 5, / 13, rounded); the one-pixel border is copied."""
  image, height, width = _as_image(image)
  v = image.astype(jnp.int32)
  window = sum(v[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3))
  weighted = window + (_SMOOTH_CENTRE_WEIGHT - 1) * v[1:-1, 1:-1]
  interior = (2 * weighted + _SMOOTH_DIVISOR) // (2 * _SMOOTH_DIVISOR)  # 13 is odd: never a tie
  return v.at[1:-1, 1:-1].set(interior).astype(jnp.uint8)


def _degenerates(image: jax.Array) -> jax.Array:
  """[4, H, W, 3]: the images the blend ops mix with: black, gray (luma), flat mean luma, smoothed."""
  image, height, width = _as_image(image)
  gray = luma(image)
  # round(mean luma) in integers: floor(sum / n + 1/2), as the host's float64 mean (exact for these sizes).
  n = height * width
  mean = (2 * jnp.sum(gray) + n) // (2 * n)
  return jnp.stack([jnp.zeros_like(image), jnp.repeat(gray[..., None], 3, -1).astype(jnp.uint8),
                    jnp.full_like(image, mean.astype(jnp.uint8)), smooth(image)])


def _tables(image: jax.Array, level) -> jax.Array:
  """int32 [4, 3, 256]: the per-channel look-up tables of AutoContrast, Equalize, Posterize and Solarize."""
  image, height, width = _as_image(image)
  values = jnp.arange(256, dtype=jnp.int32)
  channels = image.reshape(-1, 3).astype(jnp.int32).T  # [3, HW]
  low, high = channels.min(axis=1), channels.max(axis=1)
  # AutoContrast: [low, high] -> [0, 255] as int(v * scale - low * scale); a constant channel is kept.
  spread = high > low
  scale = 255.0 / jnp.where(spread, high - low, 1).astype(jnp.float32)
  stretched = values[None].astype(jnp.float32) * scale[:, None] + (-low.astype(jnp.float32) * scale)[:, None]
  autocontrast = jnp.where(spread[:, None], jnp.clip(stretched.astype(jnp.int32), 0, 255), values[None])
  # Equalize: PIL's integer table, lut[i] = (step // 2 + #pixels below i) // step.
  num_pixels = height * width
  histogram = jnp.zeros((3, 256), jnp.int32).at[jnp.arange(3)[:, None], channels].add(1)
  top_count = jnp.take_along_axis(histogram, high[:, None], axis=1)[:, 0]
  step = (num_pixels - top_count) // 255
  changes = (jnp.count_nonzero(histogram, axis=1) > 1) & (step > 0)
  safe_step = jnp.maximum(step, 1)[:, None]
  below = jnp.cumsum(histogram, axis=1) - histogram
  equalize = jnp.where(changes[:, None], jnp.minimum((safe_step // 2 + below) // safe_step, 255), values[None])
  bits = jnp.asarray(POSTERIZE_BITS)[level]
  posterize = values & (255 - ((1 << (8 - bits)) - 1))
  threshold = jnp.asarray(SOLARIZE_THRESHOLDS)[level]
  solarize = jnp.where(values < threshold, values, 255 - values)
  same = lambda table: jnp.broadcast_to(table, (3, 256))
  return jnp.stack([autocontrast, equalize, same(posterize), same(solarize)])


def apply_op(image: jax.Array, op_index, level, negate) -> jax.Array:
  """The op at position `op_index` of OP_NAMES at integer `level` (0..10), with the sign of the signed ops
  (Rotate, Shear*, Translate*) negated where `negate`; all arguments may be traced."""
  image, height, width = _as_image(image)
  op_index, level = jnp.asarray(op_index, jnp.int32), jnp.asarray(level, jnp.int32)
  member = jnp.asarray(_MEMBER)[op_index]
  geometric = affine_fixed(image, jnp.asarray(affine_table(height, width))[op_index, jnp.asarray(negate, jnp.int32),
                                                                           level])
  factor = jnp.asarray(ENHANCE_FACTORS.astype(np.float32))[level]
  blended = blend(_degenerates(image)[member], image, factor)
  table = _tables(image, level)[member]  # [3, 256]
  looked_up = table.reshape(-1)[image.astype(jnp.int32) + 256 * jnp.arange(3)].astype(jnp.uint8)
  family = jnp.asarray(_FAMILY)[op_index]
  return jnp.where(family == _GEOMETRIC, geometric, jnp.where(family == _BLEND, blended, looked_up))


def cutout(image: jax.Array, top, left, side: int) -> jax.Array:
  """Paints rows [top, top + side) x columns [left, left + side), clipped to the image, with CUTOUT_GRAY."""
  image, height, width = _as_image(image)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
  return jnp.where(inside[..., None], jnp.uint8(CUTOUT_GRAY), image)


# ----------------------------------------------------------------------------------------------------------
# One image: the random draws and the views.


def sample_weak(key, height: int, width: int, pad: int):
  """(flip, offset_y, offset_x): a left-right flip with probability 0.5, crop offsets uniform in [0, 2 * pad]."""
  flip_key, crop_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
  return jax.random.uniform(flip_key) < 0.5, offsets[0], offsets[1]


def sample_ops(key, num_ops: int, magnitude: int):
  """(op indices, levels, negate), each [num_ops]: ops uniform over OP_NAMES with replacement, each applied with
  probability 0.5 (a skipped op is Identity), levels uniform in [1, magnitude), signs negated with probability
  0.5."""
  op_key, level_key, applied_key, sign_key = jax.random.split(key, 4)
  ops = jax.random.randint(op_key, (num_ops,), 0, len(OP_NAMES))
  levels = jax.random.randint(level_key, (num_ops,), 1, magnitude)
  applied = jax.random.uniform(applied_key, (num_ops,)) < 0.5
  negate = jax.random.uniform(sign_key, (num_ops,)) < 0.5
  return jnp.where(applied, ops, IDENTITY), levels, negate


def sample_cutout(key, height: int, width: int, side: int):
  """(top, left) of a `side` square around a uniformly drawn centre, clipped at the borders (CutoutAbs)."""
  centre = jax.random.uniform(key, (2,)) * jnp.array([height, width], jnp.float32)
  corner = jnp.floor(jnp.maximum(centre - side / 2.0, 0.0)).astype(jnp.int32)
  return corner[0], corner[1]


def weak_view(image: jax.Array, key, settings: Settings) -> jax.Array:
  image, height, width = _as_image(image)
  pad = settings.pad(height, width)
  return flip_and_crop(image, *sample_weak(key, height, width, pad), pad)


def strong_view(image: jax.Array, key, settings: Settings) -> jax.Array:
  """The weak transform, then RandAugmentMC(num_ops, magnitude), then Cutout."""
  image, height, width = _as_image(image)
  weak_key, ops_key, cutout_key = jax.random.split(key, 3)
  image = weak_view(image, weak_key, settings)
  ops, levels, negate = sample_ops(ops_key, settings.num_ops, settings.magnitude)
  for i in range(settings.num_ops):
    image = apply_op(image, ops[i], levels[i], negate[i])
  side = settings.cutout_side(height, width)
  return cutout(image, *sample_cutout(cutout_key, height, width, side), side)


def unlabeled_views(image: jax.Array, key, settings: Settings):
  """(weak, strong_1, strong_2) of one image, from three keys split off `key`."""
  weak_key, strong_key_1, strong_key_2 = jax.random.split(key, 3)
  return (weak_view(image, weak_key, settings), strong_view(image, strong_key_1, settings),
          strong_view(image, strong_key_2, settings))


# ----------------------------------------------------------------------------------------------------------
# Batches.


def root_key(step_key) -> jax.Array:
  """The augmentation's root key of a run, from the run's (replicated) step key."""
  return jax.random.fold_in(step_key, _AUGMENT_TAG)


def example_keys(root, stream: int, positions) -> jax.Array:
  """One key per example: fold_in(fold_in(root, stream), position)."""
  stream_key = jax.random.fold_in(root, stream)
  return jax.vmap(jax.random.fold_in, (None, 0))(stream_key, jnp.asarray(positions, jnp.int32))


def labeled_batch(images, positions, root, settings: Settings) -> jax.Array:
  """The weak views [N, H, W, 3] of labeled images at their labeled-stream positions."""
  keys = example_keys(root, LABELED_STREAM, positions)
  return jax.vmap(functools.partial(weak_view, settings=settings))(images, keys)


def unlabeled_batch(images, positions, root, settings: Settings):
  """(weak, strong_1, strong_2), each [N, H, W, 3], of unlabeled images at their unlabeled-stream positions."""
  keys = example_keys(root, UNLABELED_STREAM, positions)
  return jax.vmap(functools.partial(unlabeled_views, settings=settings))(images, keys)


def train_images(sources, positions, step_key, settings: Settings, batch_size: int, unlabeled_size: int,
                 blocks: int) -> jax.Array:
  """The train step's `images` [B + 3U, H, W, 3] from a source batch: `sources` uint8 [B + U, H, W, 3] and
  `positions` int32 [B + U] hold x (the labeled images) and u (the unlabeled ones) device block by device block
  (`input_pipeline.pack_views` over `input_pipeline.SOURCES`); the result holds the views x, u_w, u_s, u_s' laid
  out the same way (`train_step.split_views`). Each block's rows stay on the device that holds them: the
  reshapes follow the blocks and every view is made per image.
  """
  lab, unl = batch_size // blocks, unlabeled_size // blocks
  tail = sources.shape[1:]
  rows = sources.reshape((blocks, lab + unl) + tail)
  where = positions.reshape((blocks, lab + unl))
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  root = root_key(step_key)
  x = labeled_batch(flat(rows[:, :lab]), flat(where[:, :lab]), root, settings)
  views = unlabeled_batch(flat(rows[:, lab:]), flat(where[:, lab:]), root, settings)
  grouped = [group.reshape((blocks, -1) + tail) for group in (x, *views)]
  return jnp.concatenate(grouped, axis=1).reshape((-1,) + tail)
