import numpy as np
import pytest
import tensorflow as tf

from configs import test as test_config
from semi_jax import augment, datasets, input_pipeline


@pytest.fixture(scope="module")
def setup():
  config = test_config.get_config()
  config.train.total_steps = 40
  data = input_pipeline.make_ssl_data(datasets.load(config.data), config.data, config.seed)
  return config, data


def _take(config, data, n, **kw):
  ds = input_pipeline.train_views(data, config, **kw)
  return [b for _, b in zip(range(n), input_pipeline.as_numpy(ds))]


@pytest.fixture(scope="module")
def full(setup):
  """The first 6 global batches of the single-process stream (building a stream traces the augmentations)."""
  return _take(*setup, 6)


def test_batch_keys_shapes_dtypes(setup, full):
  config, data = setup
  b = full[0]
  s, bs, u = config.data.image_size, config.train.batch_size, config.train.batch_size * config.train.mu
  assert set(b) == {"x", "y", "u_weak", "u_strong1", "u_strong2", "u_label", "u_index"}
  assert b["x"].shape == (bs, s, s, 3) and b["x"].dtype == np.uint8
  for k in ("u_weak", "u_strong1", "u_strong2"):
    assert b[k].shape == (u, s, s, 3) and b[k].dtype == np.uint8
  assert b["y"].shape == (bs,) and b["u_label"].shape == b["u_index"].shape == (u,)
  np.testing.assert_array_equal(b["u_label"], data.unlabeled_labels[b["u_index"]])
  assert not np.array_equal(b["u_strong1"], b["u_strong2"])


def test_stream_is_a_function_of_seed_and_step(setup, full):
  config, data = setup
  resumed = _take(config, data, 2, start_step=4)
  for a, b in zip(full[4:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  other = config.copy_and_resolve_references()
  other.seed = config.seed + 1
  assert not np.array_equal(_take(other, data, 1)[0]["u_index"], full[0]["u_index"])


def test_process_slices_are_disjoint_and_cover_the_global_batch(setup, full):
  config, data = setup
  single = full[:3]
  parts = [_take(config, data, 3, process_index=p, process_count=2) for p in range(2)]
  for step in range(3):
    for k in single[step]:
      np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), single[step][k],
                                    err_msg=k)
    assert not set(parts[0][step]["u_index"]) & set(parts[1][step]["u_index"])


def test_each_pass_visits_every_unlabeled_example_once(setup, full):
  config, data = setup
  n_u = len(data.unlabeled_images)
  seen = np.concatenate([b["u_index"] for b in full])
  assert len(seen) < n_u and len(set(seen)) == len(seen)  # within one pass: no repeats
  # A whole pass (positions 0..n-1) is a permutation, and the next pass a different one.
  for epoch in range(2):
    idx = np.array([int(input_pipeline._lookup(tf.constant(p, tf.int64), n_u, 12345))
                    for p in range(epoch * n_u, (epoch + 1) * n_u)])
    np.testing.assert_array_equal(np.sort(idx), np.arange(n_u))
    assert not np.array_equal(idx, np.arange(n_u))
  # Labeled examples come from the labeled subset in the stream's order, each with its own label, and each image
  # is the weak view of that example (the augmentation is a function of the stream position).
  n_x = len(data.labeled_idx)
  key = input_pipeline._stream_key(config.seed, input_pipeline.LABELED_STREAM)
  for step, batch in enumerate(full[:2]):
    for row, pos in enumerate(range(step * config.train.batch_size, (step + 1) * config.train.batch_size)):
      pick = data.labeled_idx[int(input_pipeline._lookup(tf.constant(pos, tf.int64), n_x, key))]
      assert batch["y"][row] == data.dataset.train_labels[pick]
      view = augment.labeled_view(tf.constant(data.dataset.train_images[pick]),
                                  input_pipeline._aug_seed(key, tf.constant(pos, tf.int64)),
                                  pad_fraction=config.data.pad_fraction)
      np.testing.assert_array_equal(batch["x"][row], view.numpy())


def test_batch_that_does_not_divide_over_processes_is_a_clear_error(setup):
  config, data = setup
  with pytest.raises(ValueError, match="divisible by the 3 JAX processes"):
    input_pipeline.train_views(data, config, process_count=3)


@pytest.mark.parametrize("blocks", [1, 2, 8])
def test_train_batches_pack_the_views_device_block_by_device_block(setup, full, blocks):
  """`train_dataset` packs the views for `blocks` devices; `train_step.split_views` recovers them in order."""
  from semi_jax.train_step import split_views
  config, data = setup
  packed = next(input_pipeline.as_numpy(input_pipeline.train_dataset(data, config, blocks=blocks)))
  views = full[0]
  assert set(packed) == {"images", "y", "u_label", "u_index"}
  b, u = config.train.batch_size, config.train.batch_size * config.train.mu
  assert packed["images"].shape == (b + 3 * u,) + views["x"].shape[1:] and packed["images"].dtype == np.uint8
  rows = packed["images"].reshape((blocks, -1) + views["x"].shape[1:])
  # Block d starts with the d-th slice of the labeled batch.
  np.testing.assert_array_equal(rows[:, :b // blocks].reshape(views["x"].shape), views["x"])
  for name, got in zip(input_pipeline.VIEWS, split_views(packed["images"], b, u, blocks)):
    np.testing.assert_array_equal(np.asarray(got), views[name], err_msg=name)
  for k in ("y", "u_label", "u_index"):
    np.testing.assert_array_equal(packed[k], views[k])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_eval_padding_mask_and_process_slices(processes):
  images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
  labels = np.arange(10)
  batches = [list(input_pipeline.eval_batches(images, labels, 8, process_index=p, process_count=processes))
             for p in range(processes)]
  assert all(len(b) == 2 for b in batches)  # 10 examples -> two global batches of 8
  mask = np.concatenate([np.concatenate([b[i]["mask"] for b in batches]) for i in range(2)])
  got = np.concatenate([np.concatenate([b[i]["label"] for b in batches]) for i in range(2)])
  assert mask.sum() == 10
  np.testing.assert_array_equal(got[mask], labels)


def test_labeled_and_unlabeled_sets_are_disjoint_and_long_tailed(setup):
  config, data = setup
  counts = data.labeled_counts
  assert counts[0] == config.data.labeled_max and counts[-1] == int(config.data.labeled_max
                                                                     / config.data.labeled_imb)
  assert np.all(np.diff(counts) <= 0)
  lab = {bytes(x) for x in data.dataset.train_images[data.labeled_idx]}
  unl = {bytes(x) for x in data.unlabeled_images}
  assert len(lab & unl) <= 2  # digits has a few identical images; indices are disjoint (splits test)


def test_tables_read_aligned_arrays_in_place_and_copy_the_others():
  aligned = datasets.aligned_empty((4, 2, 2, 3))
  aligned[:] = 1
  table = input_pipeline._host_table(aligned)
  aligned[2] = 7
  assert input_pipeline._gather(table, tf.constant([2])).numpy().min() == 7  # the same memory
  unaligned = np.ones((5, 2, 2, 3), np.uint8)[1:]  # 12 bytes past an allocation: never aligned
  assert not datasets.is_aligned(unaligned)
  table = input_pipeline._host_table(unaligned)
  unaligned[2] = 7
  assert input_pipeline._gather(table, tf.constant([2])).numpy().max() == 1  # a copy


def test_split_holds_indices_and_one_aligned_pool(setup):
  config, data = setup
  assert datasets.is_aligned(data.dataset.train_images)  # digits' pool is copied aligned once, here
  np.testing.assert_array_equal(data.dataset.train_images, datasets.load(config.data).train_images)
  np.testing.assert_array_equal(data.unlabeled_labels, data.dataset.train_labels[data.unlabeled_idx])
  assert data.num_unlabeled == len(data.unlabeled_idx) == len(data.unlabeled_images)
  again = input_pipeline.make_ssl_data(data.dataset, config.data, config.seed)
  assert again.dataset is data.dataset  # an aligned source is used as it is
  np.testing.assert_array_equal(again.unlabeled_idx, data.unlabeled_idx)


def test_validation_set_is_balanced_held_out_and_seeded():
  """data.val_per_class images of every class, drawn with the seed from the labeled training pool before the
  split: disjoint from the labeled and unlabeled sets, which keep their per-class counts; 0 leaves the split as
  it was."""
  config = test_config.get_config()
  dataset = datasets.load(config.data)
  plain = input_pipeline.make_ssl_data(dataset, config.data, config.seed)
  assert plain.val_idx.size == 0
  config.data.val_per_class = 7
  data = input_pipeline.make_ssl_data(dataset, config.data, config.seed)
  labels = dataset.train_labels
  np.testing.assert_array_equal(np.bincount(labels[data.val_idx], minlength=10), np.full(10, 7))
  assert not set(data.val_idx) & (set(data.labeled_idx) | set(data.unlabeled_idx))
  np.testing.assert_array_equal(data.labeled_counts, plain.labeled_counts)
  np.testing.assert_array_equal(data.unlabeled_counts, plain.unlabeled_counts)
  again = input_pipeline.make_ssl_data(dataset, config.data, config.seed)
  np.testing.assert_array_equal(again.val_idx, data.val_idx)
  other = input_pipeline.make_ssl_data(dataset, config.data, config.seed + 1)
  assert set(other.val_idx) != set(data.val_idx)
  config.data.val_per_class = 10_000
  with pytest.raises(ValueError, match=r"fewer than data.val_per_class=10000"):
    input_pipeline.make_ssl_data(dataset, config.data, config.seed)
