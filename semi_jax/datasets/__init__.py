"""Data sets as in-memory uint8 arrays, and the registry that names them.

Every source returns an `ArrayDataset`; `semi_jax.input_pipeline` turns it into the long-tailed labeled stream,
the unlabeled stream (one weak + two strong views) and the test stream. A new source registers a loader
`fn(data_config) -> ArrayDataset` under its name and class count with `register`. A loader allocates its large
arrays with `aligned_empty`: the input pipeline then reads them where they are instead of copying them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

# Alignment of `aligned_empty`. TensorFlow reads host memory in place only at its own tensor alignment
# (EIGEN_MAX_ALIGN_BYTES, at most 64); a page covers every build.
ALIGNMENT = 4096


def aligned_empty(shape: Sequence[int], dtype=np.uint8) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an `ALIGNMENT` boundary, so that
  `semi_jax.input_pipeline` can hand it to TensorFlow without a copy (numpy alone aligns to 16 bytes)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
  start = -buffer.ctypes.data % ALIGNMENT
  return buffer[start:start + nbytes].view(dtype).reshape(tuple(shape))


def is_aligned(array: np.ndarray) -> bool:
  """Whether `array` is laid out as `aligned_empty` makes it (and writeable: DLPack exports only those)."""
  return (array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0)


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A data set held in host memory. Images are uint8 [N, H, W, 3]."""
  name: str
  num_classes: int
  train_images: np.ndarray  # pool the long-tailed labeled (and unlabeled) sets are drawn from
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: tuple[float, float, float]  # per channel, images scaled to [0, 1]
  std: tuple[float, float, float]
  # A separate unlabeled set whose labels are unknown (STL-10's "unlabelled" split); None draws the
  # unlabeled set from the training pool with the configured long-tailed distribution.
  extra_unlabeled_images: np.ndarray | None = None

  def __post_init__(self):
    for field in ("train_images", "test_images", "extra_unlabeled_images"):
      images = getattr(self, field)
      if images is None:
        continue
      if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{self.name}: {field} must be square RGB images [N, H, H, 3], got {images.shape}.")
      if images.dtype != np.uint8:
        raise ValueError(f"{self.name}: {field} must be uint8, got {images.dtype}.")
    if len(self.train_images) != len(self.train_labels) or len(self.test_images) != len(self.test_labels):
      raise ValueError(f"{self.name}: images and labels differ in length.")

  @property
  def image_size(self) -> int:
    return int(self.train_images.shape[1])


_LOADERS: dict[str, Callable[..., ArrayDataset]] = {}
_NUM_CLASSES: dict[str, int] = {}


def register(name: str, num_classes: int):
  def wrap(fn):
    _LOADERS[name] = fn
    _NUM_CLASSES[name] = num_classes
    return fn
  return wrap


def names() -> list[str]:
  _import_sources()
  return sorted(_LOADERS)


def num_classes(name: str) -> int:
  """The class count of the registered data set `name`, without loading it."""
  _import_sources()
  if name not in _NUM_CLASSES:
    raise ValueError(f"unknown data set {name!r} (config field data.name); available: {', '.join(sorted(_LOADERS))}.")
  return _NUM_CLASSES[name]


def load(data_config) -> ArrayDataset:
  """Loads the data set `data_config.name` (see `names()`)."""
  _import_sources()
  if data_config.name not in _LOADERS:
    raise ValueError(f"unknown data set {data_config.name!r} (config field data.name); "
                     f"available: {', '.join(sorted(_LOADERS))}.")
  return _LOADERS[data_config.name](data_config)


def _import_sources():
  # Imported lazily so that `import semi_jax.datasets` stays cheap; each module registers its loaders.
  from semi_jax.datasets import digits  # noqa: F401
  try:
    from semi_jax.datasets import tfds_sources  # noqa: F401
  except ModuleNotFoundError as e:
    if e.name != "semi_jax.datasets.tfds_sources":
      raise
