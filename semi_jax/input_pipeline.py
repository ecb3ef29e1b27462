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
input between devices. Eval batches: image, label, mask (False on padding).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from semi_jax import augment, config_validation
from semi_jax.datasets import ArrayDataset
from semi_jax.datasets.splits import labeled_unlabeled_indices

LABELED_STREAM, UNLABELED_STREAM = 1, 2
VIEWS = ("x", "u_weak", "u_strong1", "u_strong2")  # the image groups of a train batch, in `images` order


@dataclasses.dataclass(frozen=True)
class SSLData:
  """The materialised split of a data set for one run."""
  dataset: ArrayDataset
  labeled_idx: np.ndarray
  unlabeled_images: np.ndarray
  unlabeled_labels: np.ndarray  # -1 where unknown

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

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


def make_ssl_data(dataset: ArrayDataset, data_config, seed: int) -> SSLData:
  labeled_idx, unlabeled_idx = labeled_unlabeled_indices(dataset, data_config, seed)
  if dataset.extra_unlabeled_images is not None:
    u_images = dataset.extra_unlabeled_images
    u_labels = np.full((len(u_images),), -1, np.int64)
  else:
    u_images = dataset.train_images[unlabeled_idx]
    u_labels = dataset.train_labels[unlabeled_idx]
  if len(labeled_idx) == 0 or len(u_images) == 0:
    raise ValueError(f"{dataset.name}: the split has {len(labeled_idx)} labeled and {len(u_images)} unlabeled "
                     "images; both must be non-empty (check data.labeled_max / data.unlabeled_max).")
  return SSLData(dataset, labeled_idx, u_images, u_labels)


def _host_table(array: np.ndarray) -> tf.Variable:
  """An in-memory table the pipeline gathers from. A variable, not a constant: graph constants are capped at
  2 GB (ImageNet-127's unlabeled set at 32x32 is ~3.5 GB)."""
  with tf.device("/CPU:0"):
    return tf.Variable(array, trainable=False)


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
                  blocks: int = 1) -> tf.data.Dataset:
  """The train step's batches of this process for steps start_step .. total_steps - 1: `train_views` with the
  image groups packed into `images` for `blocks` devices (this process's devices on the mesh's data axis)."""
  def pack(batch):
    images = pack_views([batch.pop(k) for k in VIEWS], blocks, xp=tnp)
    return {"images": images, **batch}
  views = train_views(data, config, start_step=start_step, process_index=process_index,
                      process_count=process_count)
  return views.map(pack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def train_views(data: SSLData, config, *, start_step: int = 0, process_index: int = 0,
                process_count: int = 1) -> tf.data.Dataset:
  """Batches of this process for steps start_step .. total_steps - 1, one key per view (see the module doc)."""
  config_validation.check_batches_divide(config, process_count, "JAX processes")
  t, d = config.train, config.data
  b, u = t.batch_size, t.batch_size * t.mu
  aug = dict(pad_fraction=d.pad_fraction)
  strong = dict(num_ops=d.randaugment_ops, magnitude=d.randaugment_magnitude,
                cutout_fraction=d.cutout_fraction, pad_fraction=d.pad_fraction)
  x_images = _host_table(data.dataset.train_images[data.labeled_idx])
  x_labels = _host_table(data.dataset.train_labels[data.labeled_idx].astype(np.int32))
  u_images = _host_table(data.unlabeled_images)
  u_labels = _host_table(data.unlabeled_labels.astype(np.int32))
  n_x, n_u = len(data.labeled_idx), len(data.unlabeled_images)
  kx, ku = _stream_key(config.seed, LABELED_STREAM), _stream_key(config.seed, UNLABELED_STREAM)

  def labeled(pos):
    i = _lookup(pos, n_x, kx)
    return {"x": augment.labeled_view(tf.gather(x_images, i), _aug_seed(kx, pos), **aug),
            "y": tf.gather(x_labels, i)}

  def unlabeled(pos):
    i = _lookup(pos, n_u, ku)
    weak, s1, s2 = augment.unlabeled_views(tf.gather(u_images, i), _aug_seed(ku, pos), **strong)
    return {"u_weak": weak, "u_strong1": s1, "u_strong2": s2, "u_label": tf.gather(u_labels, i),
            "u_index": tf.cast(i, tf.int32)}

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
  n = len(images)
  total = -(-n // global_batch) * global_batch
  pad = total - n
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels.astype(np.int32), np.zeros((pad,), np.int32)])
  mask = np.arange(total) < n
  local = global_batch // process_count
  for start in range(0, total, global_batch):
    sl = slice(start + process_index * local, start + (process_index + 1) * local)
    yield {"image": images[sl], "label": labels[sl], "mask": mask[sl]}


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  return ds.as_numpy_iterator()
