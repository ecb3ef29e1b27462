"""tf.data input pipelines: long-tailed labeled stream, unlabeled stream (weak + two strong views), test stream.

Every training stream is a pure function of (seed, step): the example at global position `pos` of an
infinite stream is `index_shuffle(pos % n, key(seed, epoch = pos // n))` and its augmentation is seeded by
(seed, stream, pos). So
  * a restarted run reads exactly the batches an uninterrupted run would have read (no iterator state),
  * every process computes the same global order and takes its own contiguous slice of every global
    batch (`global_batch / process_count` examples), disjoint from and covering the other processes'.
Images stay uint8 until the train step normalises them on device.

`train_views` batches have the keys x, y (labeled); u_weak, u_strong1, u_strong2, u_label (true label,
diagnostics only, -1 if unknown), u_index (index into the unlabeled set). `train_dataset`, what the train step
reads, packs the four image groups into one array `images` laid out device block by device block
(`pack_views`), so that the step finds each device's rows of every group in that device's shard and moves no
input between devices. With the augmentation on the device (`data.augment_on`, `views_on_device=True`) the
streams stop before augmenting: `train_views` gives x and u, the source images, with x_position and u_position,
their int32 stream positions, and `train_dataset` packs x and u into `images` and their positions into
`positions` the same way, from which the train step makes the views (`device_augment.train_images`); the
examples, their order and their positions are those of the host path. Eval batches: image, label, mask (False on
padding).

Host memory: the split is kept as indices, and the streams gather from the data set's own arrays, which
TensorFlow reads in place where they are aligned as `datasets.aligned_empty` makes them (the loaders do):
a process holds its images once, not once per stream.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow.experimental.numpy as tnp
from absl import logging

from semi_jax import augment, config_validation, datasets
from semi_jax.datasets import ArrayDataset
from semi_jax.datasets.splits import labeled_unlabeled_indices, validation_indices

LABELED_STREAM, UNLABELED_STREAM = 1, 2
VIEWS = ("x", "u_weak", "u_strong1", "u_strong2")  # the image groups of a train batch, in `images` order
SOURCES = ("x", "u")  # the image groups of a source batch (views made on the device), in `images` order


@dataclasses.dataclass(frozen=True)
class SSLData:
  """The split of a data set for one run, as indices into the data set's arrays (no image copies)."""
  dataset: ArrayDataset
  labeled_idx: np.ndarray  # into dataset.train_images
  unlabeled_idx: np.ndarray | None  # into dataset.train_images; None: the set is dataset.extra_unlabeled_images
  unlabeled_labels: np.ndarray  # -1 where unknown
  val_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))  # validation set

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

  @property
  def num_unlabeled(self) -> int:
    return len(self.unlabeled_labels)

  @property
  def unlabeled_images(self) -> np.ndarray:
    """The unlabeled images in unlabeled-index order: a copy when they come from the training pool (for
    inspection; the streams gather from the pool itself)."""
    if self.unlabeled_idx is None:
      return self.dataset.extra_unlabeled_images
    return self.dataset.train_images[self.unlabeled_idx]

  @property
  def labeled_counts(self) -> np.ndarray:
    return np.bincount(self.dataset.train_labels[self.labeled_idx], minlength=self.num_classes)

  @property
  def class_prior(self) -> np.ndarray:
    counts = self.labeled_counts.astype(np.float64)
    return counts / counts.sum()

  @property
  def unlabeled_counts(self) -> np.ndarray:
    known = self.unlabeled_labels[self.unlabeled_labels >= 0]
    return np.bincount(known, minlength=self.num_classes)

  def validation_set(self) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the held-out validation set (empty without one)."""
    return self.dataset.train_images[self.val_idx], self.dataset.train_labels[self.val_idx]


def make_ssl_data(dataset: ArrayDataset, data_config, seed: int) -> SSLData:
  """The run's split of `dataset`. Its image tables are made aligned (`datasets.aligned_empty`) first where a
  source did not allocate them so: a one-off copy, after which the caller's original can go."""
  tables = {f: getattr(dataset, f) for f in ("train_images", "extra_unlabeled_images")}
  realigned = {f: _aligned(a, f"{dataset.name}.{f}") for f, a in tables.items() if a is not None}
  if any(realigned[f] is not tables[f] for f in realigned):
    dataset = dataclasses.replace(dataset, **realigned)
  val_idx = validation_indices(dataset, int(data_config.val_per_class), seed)
  labeled_idx, unlabeled_idx = labeled_unlabeled_indices(dataset, data_config, seed, exclude=val_idx)
  if dataset.extra_unlabeled_images is not None:
    unlabeled_idx = None
    u_labels = np.full((len(dataset.extra_unlabeled_images),), -1, np.int64)
  else:
    u_labels = dataset.train_labels[unlabeled_idx]
  if len(labeled_idx) == 0 or len(u_labels) == 0:
    raise ValueError(f"{dataset.name}: the split has {len(labeled_idx)} labeled and {len(u_labels)} unlabeled "
                     "images; both must be non-empty (check data.labeled_max / data.unlabeled_max).")
  return SSLData(dataset, labeled_idx, unlabeled_idx, u_labels, val_idx)


_COPY_WARNING_BYTES = 1 << 28  # a copy of a table this large is worth a warning


def _aligned(array: np.ndarray, what: str = "a table") -> np.ndarray:
  """`array` itself where `datasets.is_aligned`, else an aligned copy."""
  if datasets.is_aligned(array):
    return array
  if array.nbytes >= _COPY_WARNING_BYTES:
    logging.warning("input pipeline: copying %s (%.1f GB), which is not aligned for TensorFlow; a loader that "
                    "allocates it with semi_jax.datasets.aligned_empty saves the copy.", what, array.nbytes / 1e9)
  copy = datasets.aligned_empty(array.shape, array.dtype)
  copy[...] = array
  return copy


def _host_table(array: np.ndarray) -> tf.Variable:
  """An in-memory table the pipeline gathers from with `_gather`. A variable, not a constant: graph constants
  are capped at 2 GB, and tf.data's graph rewrites copy captured tensors, not variables. It aliases `array`
  (through DLPack) where `datasets.is_aligned(array)`, else an aligned copy of it."""
  array = _aligned(array)
  with tf.device("/CPU:0"):
    return tf.Variable(tf.experimental.dlpack.from_dlpack(array.__dlpack__()), trainable=False)


def _gather(table: tf.Variable, indices):
  """table[indices] through a dense read (a reference to the variable's buffer). Never tf.gather on the variable
  itself: a sparse read switches the variable to copy-on-read and copies a buffer it shares (an aliased
  array) on first use, and every later dense read would copy the whole table."""
  return tf.gather(table.value(), indices)


def _stream_key(seed: int, stream: int) -> int:
  return (int(seed) * 1_000_003 + stream * 7919) % (2**31 - 1)


def _positions(start_step, total_steps, global_batch, process_index, process_count):
  """Global stream positions of this process's examples, step by step from `start_step`."""
  local = global_batch // process_count
  k = tf.data.Dataset.range(start_step * local, total_steps * local)
  return k.map(lambda i: (i // local) * global_batch + process_index * local + i % local)


def _lookup(pos, n, key):
  """Index of the example at stream position `pos`: a fresh permutation of [0, n) per pass over the data."""
  epoch = pos // n
  seed = tf.stack([tf.constant(key, tf.int64), epoch])
  return tf.random.experimental.index_shuffle(pos % n, seed, n - 1)


def _aug_seed(key, pos):
  return tf.stack([tf.constant(key, tf.int64), pos])


def pack_views(views, blocks: int, xp=np):
  """[x, u_w, u_s, u_s'] as one array of `blocks` blocks, block d = (x[d], u_w[d], u_s[d], u_s'[d]) where a[d] is
  the d-th of `blocks` equal slices of a (`train_step.split_views` is the inverse). `xp`: numpy, or
  tensorflow.experimental.numpy inside a tf.data pipeline."""
  tail = tuple(views[0].shape[1:])
  return xp.reshape(xp.concatenate([xp.reshape(v, (blocks, -1) + tail) for v in views], axis=1), (-1,) + tail)


def train_dataset(data: SSLData, config, *, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  blocks: int = 1, views_on_device: bool = False) -> tf.data.Dataset:
  """The train step's batches of this process for steps start_step .. total_steps - 1: `train_views` with the
  image groups packed into `images` for `blocks` devices (this process's devices on the mesh's data axis); with
  `views_on_device`, the source images and their positions (see the module doc)."""
  def pack(batch):
    images = pack_views([batch.pop(k) for k in VIEWS], blocks, xp=tnp)
    return {"images": images, **batch}

  def pack_sources(batch):
    images = pack_views([batch.pop(k) for k in SOURCES], blocks, xp=tnp)
    positions = pack_views([batch.pop(f"{k}_position") for k in SOURCES], blocks, xp=tnp)
    return {"images": images, "positions": positions, **batch}
  views = train_views(data, config, start_step=start_step, process_index=process_index,
                      process_count=process_count, views_on_device=views_on_device)
  if views_on_device:
    return views.map(pack_sources, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
        tf.data.AUTOTUNE)
  return views.map(pack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def train_views(data: SSLData, config, *, start_step: int = 0, process_index: int = 0,
                process_count: int = 1, views_on_device: bool = False) -> tf.data.Dataset:
  """Batches of this process for steps start_step .. total_steps - 1, one key per view (see the module doc);
  with `views_on_device`, the source images and their stream positions instead of the views."""
  config_validation.check_batches_divide(config, process_count, "JAX processes")
  t, d = config.train, config.data
  b, u = t.batch_size, t.batch_size * t.mu
  aug = dict(pad_fraction=d.pad_fraction)
  strong = dict(num_ops=d.randaugment_ops, magnitude=d.randaugment_magnitude,
                cutout_fraction=d.cutout_fraction, pad_fraction=d.pad_fraction)
  # One table per image array, shared by the streams, which gather by index (a process holds its images once).
  pool = _host_table(data.dataset.train_images)
  x_index = _host_table(data.labeled_idx)
  x_labels = _host_table(data.dataset.train_labels[data.labeled_idx].astype(np.int32))
  if data.unlabeled_idx is None:
    u_images, u_index = _host_table(data.dataset.extra_unlabeled_images), None
  else:
    u_images, u_index = pool, _host_table(data.unlabeled_idx)
  u_labels = _host_table(data.unlabeled_labels.astype(np.int32))
  n_x, n_u = len(data.labeled_idx), data.num_unlabeled
  kx, ku = _stream_key(config.seed, LABELED_STREAM), _stream_key(config.seed, UNLABELED_STREAM)

  def labeled(pos):
    i = _lookup(pos, n_x, kx)
    image = _gather(pool, _gather(x_index, i))
    if views_on_device:
      return {"x": image, "x_position": tf.cast(pos, tf.int32), "y": _gather(x_labels, i)}
    return {"x": augment.labeled_view(image, _aug_seed(kx, pos), **aug), "y": _gather(x_labels, i)}

  def unlabeled(pos):
    i = _lookup(pos, n_u, ku)
    image = _gather(u_images, i if u_index is None else _gather(u_index, i))
    labels = {"u_label": _gather(u_labels, i), "u_index": tf.cast(i, tf.int32)}
    if views_on_device:
      return {"u": image, "u_position": tf.cast(pos, tf.int32), **labels}
    weak, s1, s2 = augment.unlabeled_views(image, _aug_seed(ku, pos), **strong)
    return {"u_weak": weak, "u_strong1": s1, "u_strong2": s2, **labels}

  opts = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  lab = _positions(start_step, t.total_steps, b, process_index, process_count).map(labeled, **opts)
  unl = _positions(start_step, t.total_steps, u, process_index, process_count).map(unlabeled, **opts)
  lab = lab.batch(b // process_count, drop_remainder=True)
  unl = unl.batch(u // process_count, drop_remainder=True)
  return tf.data.Dataset.zip(lab, unl).map(lambda a, c: {**a, **c})


def eval_batches(images: np.ndarray, labels: np.ndarray, global_batch: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """This process's slices of the padded global eval batches; `mask` is False on padding."""
  if global_batch % process_count:
    raise ValueError(f"train.eval_batch_size={global_batch} does not divide over {process_count} processes.")
  n, local = len(images), global_batch // process_count
  for start in range(0, n, global_batch):
    lo, hi = start + process_index * local, start + (process_index + 1) * local
    image, label = images[lo:hi], labels[lo:hi].astype(np.int32)
    pad = local - len(image)
    if pad:  # only the last global batch is padded: no copy of the whole test set
      image = np.concatenate([image, np.zeros((pad,) + images.shape[1:], images.dtype)])
      label = np.concatenate([label, np.zeros((pad,), np.int32)])
    yield {"image": image, "label": label, "mask": np.arange(lo, hi) < n}


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  return ds.as_numpy_iterator()
