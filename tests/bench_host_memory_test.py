"""The host-memory benchmark runs end to end at a tiny size, 1 and 2 processes, and prints its figures."""
import json
import re

import numpy as np

from semi_jax import datasets
from semi_jax.tools import bench_host_memory


def test_tiny_run_prints_raw_bytes_peaks_and_ratios(tmp_path, capsys):
  out = tmp_path / "memory.json"
  bench_host_memory.main(["--num_images=2000", "--num_test=100", "--image_size=8", "--steps=2", "--batch_size=8",
                          "--processes=1,2", f"--out={out}"])
  printed = capsys.readouterr().out
  raw = 2000 * 8 * 8 * 3 + 2000 * 8 + 100 * 8 * 8 * 3 + 100 * 8  # images and int64 labels, train and test
  result = json.loads(out.read_text())
  assert sorted(result) == ["1", "2"]
  assert [(r["process_index"], r["process_count"]) for r in result["2"]] == [(0, 2), (1, 2)]
  for r in result["1"] + result["2"]:
    assert r["raw"] == raw and r["steps"] == 2
    assert r["labeled_per_step"] == 8 // r["process_count"]
    assert set(r["phases"]) == {"startup", "input_steps", "eval_input"}
    assert all(p["peak"] >= p["rss"] > 0 for p in r["phases"].values())
    assert r["peak"] >= max(p["peak"] for p in r["phases"].values())
  assert printed.count(f"raw data {raw / 1e9:.2f} GB ({raw:,} bytes)") == 3
  for label in ("start-up peak", "input-steps peak (2 steps)", "whole run peak"):
    assert len(re.findall(re.escape(label) + r" +[\d.]+ GB +peak/raw +[\d.]+", printed)) == 3, label


def test_synthetic_data_is_long_tailed_and_aligned():
  d = bench_host_memory.synthetic_dataset(3000, 10, 4)
  counts = np.bincount(d.train_labels, minlength=127)
  assert len(d.train_labels) == 3000 and counts.min() >= 1 and counts[0] > 100 * counts[-1]
  assert d.train_images.shape == (3000, 4, 4, 3) and datasets.is_aligned(d.train_images)
  assert d.train_images.std() > 0
  # The benchmark raises the tail so that its split (10 % labeled) labels an image of every class.
  counts = np.bincount(bench_host_memory.synthetic_dataset(3000, 10, 4, min_count=6).train_labels, minlength=127)
  assert counts.min() == 6 and counts.sum() == 3000 and np.round(counts * 0.1).min() == 1
