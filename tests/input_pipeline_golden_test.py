"""Pins the exact train and eval batches of small configurations, so that changes to how the pipeline holds its
tables (memory layout, index tables, sharing) cannot change a single byte of what the train step reads.

The digests were recorded from the pipeline that gathered from copies of the labeled and unlabeled images
(TensorFlow 2.21 on CPU). Every stream keeps its (seed, position) definition; a mismatch here means a stream
changed, not only its memory use.
"""
import hashlib

import numpy as np
import pytest

from configs import test as test_config
from semi_jax import datasets, input_pipeline
from semi_jax.datasets import ArrayDataset


def _digests(batches) -> dict:
  """sha256 (first 16 hex digits) per key over the batches: dtype, shape and bytes of every batch."""
  out = {}
  for key in batches[0]:
    h = hashlib.sha256()
    for b in batches:
      a = np.ascontiguousarray(b[key])
      h.update(f"{a.dtype}{a.shape}".encode())
      h.update(a.tobytes())
    out[key] = h.hexdigest()[:16]
  return out


def _take(ds, n):
  return [b for _, b in zip(range(n), input_pipeline.as_numpy(ds))]


def _pattern_images(n: int, size: int, salt: int) -> np.ndarray:
  """Deterministic, varied uint8 pixels (no RNG, so independent of numpy's generator streams)."""
  k = np.arange(n * size * size * 3, dtype=np.uint64) + np.uint64(salt)
  return ((k * np.uint64(2654435761)) >> np.uint64(13)).astype(np.uint8).reshape(n, size, size, 3)


def _synthetic(kind: str) -> ArrayDataset:
  size = 16
  if kind == "extra":  # STL-10-like: a separate unlabeled set of unknown labels
    labels = np.repeat(np.arange(10), 30)
    extra = _pattern_images(200, size, salt=7)
  else:  # ImageNet-127-like: natural long tail, labeled_fraction of every class
    labels = np.repeat(np.arange(6), [120, 90, 60, 40, 30, 20])
    extra = None
  labels = labels[np.argsort((np.arange(len(labels)) * 7919) % len(labels), kind="stable")]
  return ArrayDataset(name=f"synthetic_{kind}", num_classes=int(labels.max()) + 1,
                      train_images=_pattern_images(len(labels), size, salt=1), train_labels=labels.astype(np.int64),
                      test_images=_pattern_images(50, size, salt=3), test_labels=np.arange(50, dtype=np.int64) % 6,
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), extra_unlabeled_images=extra)


def _setup(kind: str):
  config = test_config.get_config()
  config.train.total_steps = 40
  if kind == "digits":
    dataset = datasets.load(config.data)
  else:
    config.data.image_size = 16
    if kind == "fraction":
      config.data.labeled_fraction = 0.2
    else:
      config.data.labeled_max, config.data.labeled_imb = 20, 5.0
    dataset = _synthetic(kind)
  return config, input_pipeline.make_ssl_data(dataset, config.data, config.seed)


# Recorded from the pipeline before the image tables were shared (see the module doc).
GOLDEN = {
    "digits": {
        "single": {"x": "c389cf7413d2ab86", "y": "ed4d2dd06a28670a", "u_weak": "81890419c90ffb4a",
            "u_strong1": "bf45e93853beb004", "u_strong2": "074dd2ae8b87f4e4", "u_label": "2a94f3c51d915819",
            "u_index": "cc4d9690fb41dfe4"},
        "process_1_of_2": {"x": "ba8094efcbd9b162", "y": "e67b37ed9e47e17a", "u_weak": "1e06c52adfc60101",
            "u_strong1": "dfcc516b1104839d", "u_strong2": "16a1841882724d02", "u_label": "e4f17513df1930ea",
            "u_index": "b93522a85473ae6c"},
        "resumed_at_20": {"x": "fb424758c19bf89d", "y": "12f7df1149d4f807", "u_weak": "f5708b3ed871321b",
            "u_strong1": "32634165806bceaf", "u_strong2": "9e5889336a9d77f9", "u_label": "fa71bdcf73a1af71",
            "u_index": "bae82fa47a8ddb86"},
        "packed_2_blocks": {"images": "a15a94c21fec882f", "y": "451aa83a46a0379d", "u_label": "7d4a1d585f253e52",
            "u_index": "a496d75a9b93a1df"},
        "eval_process_1_of_2": {"image": "7b1440a1fd71ce4d", "label": "9f2f7fe5017304f9", "mask": "0d5c76c8634dc6e7"},
    },
    "extra": {
        "single": {"x": "b40e2f7334bf4c3d", "y": "1a549bf98f629481", "u_weak": "29b63e44f81f5564",
            "u_strong1": "62e35809852914d5", "u_strong2": "590b9a1ed1e95d19", "u_label": "8d626063f328736b",
            "u_index": "ec6b1dc365b00146"},
        "process_1_of_2": {"x": "055ac5dc32a694ab", "y": "ac731d819a37ce33", "u_weak": "5b7e6bb5d8b489c5",
            "u_strong1": "264d0662ca39f9b4", "u_strong2": "aa0edb5bb8067cee", "u_label": "a7d2d13e9f3d5144",
            "u_index": "76eab59185b5716b"},
        "resumed_at_20": {"x": "5c544702917db787", "y": "4347d8488ae1033b", "u_weak": "e8a2b6b957b00a77",
            "u_strong1": "7954e936e5068eec", "u_strong2": "5aba49b80d30e5da", "u_label": "2fa86bbbb9d89a89",
            "u_index": "39895cc0b8eb93e5"},
        "packed_2_blocks": {"images": "a8958ff09ca7a30f", "y": "3cfc3a191fdccbdd", "u_label": "8fea3d7bfe2c5f97",
            "u_index": "f1c0bf51d1b59749"},
        "eval_process_1_of_2": {"image": "2fed407c07be75b3", "label": "d8e07ef396ef07aa", "mask": "54260beb544ec9ea"},
    },
    "fraction": {
        "single": {"x": "ef49d8bdf97d5521", "y": "3bc27b40777dc8f1", "u_weak": "3c2387b9869b887b",
            "u_strong1": "678a96aafc0dd972", "u_strong2": "e39965c477920ed4", "u_label": "a3ce39f2472798ad",
            "u_index": "a57c7285d1b41bdb"},
        "process_1_of_2": {"x": "0d6f72d41a3fe251", "y": "c3a67ae831e20dad", "u_weak": "42a45eb4a61cc970",
            "u_strong1": "00c62c1a4c422af1", "u_strong2": "cb2d464f1699033b", "u_label": "c0051b53b8beb41a",
            "u_index": "c2acb28bb4813991"},
        "resumed_at_20": {"x": "0633d038c0488c17", "y": "7aa8fb9c5720c571", "u_weak": "7b650a3fd160694a",
            "u_strong1": "8b0598134a000c6f", "u_strong2": "3b302e2936827cfb", "u_label": "4132e1dcdca28564",
            "u_index": "ef9fbfc6f1d0d98e"},
        "packed_2_blocks": {"images": "21fb505d3afbef79", "y": "cc7fc6e020bb1736", "u_label": "40f1db2b519237a4",
            "u_index": "ca69b524c4b338bb"},
        "eval_process_1_of_2": {"image": "2fed407c07be75b3", "label": "d8e07ef396ef07aa", "mask": "54260beb544ec9ea"},
    },
}


def _streams(config, data) -> dict:
  views = input_pipeline.train_views
  return {
      "single": _take(views(data, config), 4),
      "process_1_of_2": _take(views(data, config, process_index=1, process_count=2), 2),
      "resumed_at_20": _take(views(data, config, start_step=20), 2),  # past the first pass over the labeled set
      "packed_2_blocks": _take(input_pipeline.train_dataset(data, config, blocks=2), 1),
      "eval_process_1_of_2": list(input_pipeline.eval_batches(
          data.dataset.test_images, data.dataset.test_labels, 32, process_index=1, process_count=2)),
  }


@pytest.mark.parametrize("kind", ["digits", "extra", "fraction"])
def test_batches_are_pinned(kind):
  config, data = _setup(kind)
  got = {name: _digests(batches) for name, batches in _streams(config, data).items()}
  assert got == GOLDEN[kind]
