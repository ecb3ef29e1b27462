"""The data preparation command: TFDS builds the data set once, the printed sizes and class counts are a run's,
--check and --list, the ImageNet manual step, one-line errors, and the run's missing-data error naming the command.

Offline: a tiny real CIFAR-10 is prepared by TFDS's own builder from generated files in CIFAR's binary format
(TFDS's download manager hands the builder that folder instead of downloading).
"""
import contextlib
import io
import pathlib
import re

import numpy as np
import pytest

from configs import default
from semi_jax import config_files, datasets, input_pipeline, long_tail
from semi_jax.datasets import tfds_sources
from semi_jax.tools import prepare_data

tfds = prepare_data.tfds_module()

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, NUM_TEST = 50, 20
COMMAND = "python -m semi_jax.tools.prepare_data"
# A CIFAR-10-LT config scaled to the tiny data set: labeled 20 -> 20/gamma, unlabeled 24 -> 24/gamma, 3 validation
# images per class; the config argument `imb=` sets gamma as for configs/cifar10_lt.py.
SMALL_CONFIG = """
from configs import cifar10_lt, default


def get_config(arg=None):
  config = cifar10_lt.get_config()
  config.data.labeled_max, config.data.unlabeled_max, config.data.val_per_class = 20, 24, 3
  config.seed = 7
  return default.apply_args(config, arg)
"""


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths are given and printed relative to the repository root, as users run it


def _write_cifar10_download(folder: pathlib.Path) -> None:
  """The extracted cifar-10-binary.tar.gz: records of 1 label byte + 3072 image bytes, 5 train batches, 1 test."""
  rng = np.random.default_rng(0)
  bins = folder / "cifar-10-batches-bin"
  bins.mkdir(parents=True)

  def write(path, labels):
    images = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    path.write_bytes(np.concatenate([np.asarray(labels, np.uint8)[:, None], images], axis=1).tobytes())

  train_labels = np.repeat(np.arange(10), TRAIN_PER_CLASS)
  for i in range(5):
    write(bins / f"data_batch_{i + 1}.bin", train_labels[i::5])
  write(bins / "test_batch.bin", np.arange(NUM_TEST) % 10)
  (bins / "batches.meta.txt").write_text("\n".join(f"class{c}" for c in range(10)) + "\n")


def _main(*argv) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = prepare_data.main(list(argv))
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A tiny CIFAR-10 prepared by `prepare_data` through TFDS's builder: (data_dir, config path, calls, stdout)."""
  root = tmp_path_factory.mktemp("prepared")
  _write_cifar10_download(root / "download")
  config = root / "small_cifar10.py"
  config.write_text(SMALL_CONFIG)
  calls = []
  original = tfds.core.DatasetBuilder.download_and_prepare

  def spy(self, *args, **kwargs):
    calls.append((self.name, str(self.data_dir)))
    return original(self, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(root / "download"))
    mp.setattr(tfds.core.DatasetBuilder, "download_and_prepare", spy)
    mp.setattr(prepare_data, "check_network", lambda *args: None)
    code, out, err = _main("--dataset=cifar10", f"--data_dir={root / 'tfds'}", f"--config={config}:imb=4")
  assert code == 0, err
  return root / "tfds", config, calls, out


def _counts_table(out: str) -> dict[str, list[int]]:
  """The printed per-class table: {column title: [count of class 0, 1, ...]}."""
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("class counts of"))
  titles = lines[start + 1].split()[1:]
  rows = []
  for line in lines[start + 2:]:
    fields = line.split()
    if not fields or not fields[0].isdigit():
      break
    rows.append([int(f.replace(",", "")) for f in fields[1:]])
  return {title: [row[i] for row in rows] for i, title in enumerate(titles)}


def test_prepares_through_tfds_builder_once(prepared, monkeypatch):
  data_dir, config, calls, out = prepared
  assert calls == [("cifar10", str(data_dir / "cifar10" / "3.0.2"))]
  assert "prepared TFDS cifar10" in out
  assert tfds.builder("cifar10", data_dir=str(data_dir)).is_prepared()
  # Again: already prepared, so TFDS downloads and builds nothing.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda self, *a, **k: pytest.fail("download_and_prepare called on a prepared data set"))
  code, out, _ = _main("--dataset=cifar10", f"--data_dir={data_dir}", f"--config={config}", "--no-counts")
  assert code == 0 and "already prepared" in out and "class counts" not in out


def test_prepare_calls_builder_only_when_not_prepared(tmp_path, monkeypatch):
  prepared_state, calls = {"cifar100": False}, []

  def download_and_prepare(self, *args, **kwargs):
    calls.append((self.name, str(self.data_dir)))
    prepared_state[self.name] = True

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: prepared_state[self.name])
  monkeypatch.setattr(prepare_data, "check_network", lambda *args: None)
  monkeypatch.setattr(prepare_data, "split_sizes", lambda tfds_name, data_dir: {"train": 50000, "test": 10000})
  for _ in range(2):
    code, out, err = _main("--dataset=cifar100", f"--data_dir={tmp_path}", "--no-counts")
    assert code == 0, err
  assert calls == [("cifar100", str(tmp_path / "cifar100" / "3.0.2"))]
  assert "already prepared" in out and "train" in out and "50,000" in out


def test_sizes_and_counts_are_what_the_run_draws(prepared):
  data_dir, config_path, _, out = prepared
  assert re.search(r"^  train +500$", out, re.M) and re.search(rf"^  test +{NUM_TEST}$", out, re.M)
  table = _counts_table(out)
  assert f"class counts of {config_path}:imb=4 (seed 7)" in out
  # Independent expectation: the long tail with gamma = 4 from the config's head counts, 3 validation per class.
  assert table["labeled"] == long_tail.class_counts(20, 4.0, 10)
  assert table["unlabeled"] == long_tail.class_counts(24, 4.0, 10)
  assert table["validation"] == [3] * 10
  # ... and what a run's input pipeline draws from the prepared data.
  config = config_files.load(f"{config_path}:imb=4")
  config.data.data_dir = str(data_dir)
  ssl = input_pipeline.make_ssl_data(datasets.load(config.data), config.data, config.seed)
  assert table["labeled"] == ssl.labeled_counts.tolist()
  assert table["unlabeled"] == ssl.unlabeled_counts.tolist()
  assert table["validation"] == np.bincount(ssl.dataset.train_labels[ssl.val_idx], minlength=10).tolist()


def test_check_exit_codes(prepared, tmp_path, monkeypatch):
  data_dir, config, _, _ = prepared
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda self, *a, **k: pytest.fail("--check downloaded"))
  code, out, _ = _main("--dataset=cifar10", f"--data_dir={data_dir}", f"--config={config}:imb=10", "--check")
  assert code == 0 and "is prepared" in out and "cifar10: ready." in out
  assert _counts_table(out)["labeled"] == long_tail.class_counts(20, 10.0, 10)
  code, out, _ = _main("--dataset=cifar10", f"--data_dir={tmp_path}", "--check")
  assert code == 1 and "NOT prepared" in out
  assert f"{COMMAND} --dataset=cifar10 --data_dir={tmp_path}" in out
  assert not (tmp_path / "cifar10").exists()


def test_embedded_digits_needs_nothing():
  code, out, _ = _main("--dataset=digits", "--check")
  assert code == 0 and "nothing to prepare" in out
  assert "class counts of configs/digits_lt.py" in out and "digits: ready." in out


def test_imagenet_manual_step(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", lambda self, *a, **k: calls.append(self.name))
  manual = tmp_path / "downloads" / "manual"
  for name, size, archives in [("imagenet127_32", 32, ["Imagenet32_train_npz.zip", "Imagenet32_val_npz.zip"]),
                               ("imagenet127_64", 64, ["Imagenet64_train_part1_npz.zip",
                                                       "Imagenet64_train_part2_npz.zip", "Imagenet64_val_npz.zip"])]:
    tfds_name = f"imagenet_resized/{size}x{size}"
    # The archives are those TFDS's builder downloads (the file names of its registered checksums).
    known = {info.filename for info in tfds.builder(tfds_name, data_dir=str(tmp_path)).url_infos.values()}
    assert set(archives) <= known and list(tfds_sources.IMAGENET_RESIZED_ARCHIVES[tfds_name]) == archives
    code, out, _ = _main(f"--dataset={name}", f"--data_dir={tmp_path}")
    assert code == 1 and not calls
    assert all(a in out for a in archives) and f"{manual}/" in out and "image-net.org" in out
    assert "imagenet_resized" in out and f"{COMMAND} --dataset={name} --data_dir={tmp_path} --check" in out
    code, out, _ = _main(f"--dataset={name}", f"--data_dir={tmp_path}", "--check")
    assert code == 1 and f"missing {', '.join(archives)}" in out
  # With the archives in place, TFDS's builder builds the data set from them.
  manual.mkdir(parents=True)
  for archive in tfds_sources.IMAGENET_RESIZED_ARCHIVES["imagenet_resized/32x32"]:
    (manual / archive).write_bytes(b"")
  monkeypatch.setattr(prepare_data, "split_sizes", lambda tfds_name, data_dir: {})
  code, out, err = _main("--dataset=imagenet127_32", f"--data_dir={tmp_path}", "--no-counts")
  assert code == 0 and calls == ["imagenet_resized"], err
  assert "from the archives in downloads/manual" in out


def test_list_names_tfds_data_sets_and_configs(tmp_path):
  code, out, _ = _main("--list", f"--data_dir={tmp_path}")
  assert code == 0
  rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
  assert set(rows) == set(datasets.names())
  for name, tfds_name in tfds_sources.TFDS_NAMES.items():
    assert rows[name][1:3] == [tfds_name, "no"]
  assert rows["svhn"][1] == "svhn_cropped" and "configs/svhn_lt.py" in rows["svhn"]
  assert "configs/imagenet127.py:size=64" in rows["imagenet127_64"]
  assert "configs/cifar10_lt.py" in rows["cifar10"]
  assert rows["digits"][1:3] == ["(embedded)", "always"] and "configs/digits_lt.py," in rows["digits"]


def test_every_tfds_source_has_a_tfds_name():
  assert set(datasets.names()) - set(tfds_sources.TFDS_NAMES) == set(prepare_data.EMBEDDED) == {"digits"}
  assert prepare_data.default_config("cifar10") == "configs/cifar10_lt.py"
  assert prepare_data.default_config("imagenet127_64") == "configs/imagenet127.py:size=64"


def _one_line_error(argv, *fragments):
  code, out, err = _main(*argv)
  assert code == 1 and "Traceback" not in out + err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("semi_jax.tools.prepare_data: error: "), err
  for fragment in fragments:
    assert fragment in lines[0]


def test_one_line_errors(tmp_path, monkeypatch):
  _one_line_error(["--dataset=cifar1000"], "unknown data set 'cifar1000'", "cifar10, cifar100", "--list")
  _one_line_error(["--dataset=cifar10", "--config=configs/svhn_lt.py"], "reads the data set 'svhn'",
                  "--dataset=svhn")
  _one_line_error(["--config=configs/nothing.py"], "configs/nothing.py", "--config=")
  blocker = tmp_path / "file"
  blocker.write_text("")
  _one_line_error(["--dataset=cifar10", f"--data_dir={blocker}/tfds", "--no-counts"],
                  f"cannot write to the data directory {blocker}/tfds", "writable --data_dir")

  def unreachable(address, timeout=None):
    raise OSError(f"[Errno -3] Temporary failure in name resolution: {address[0]}")

  monkeypatch.setattr(prepare_data.urllib.request, "getproxies", lambda: {})
  monkeypatch.setattr(prepare_data.socket, "create_connection", unreachable)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda self, *a, **k: pytest.fail("downloaded without a network"))
  _one_line_error(["--dataset=svhn", f"--data_dir={tmp_path}/tfds"], "no network",
                  "cannot reach ufldl.stanford.edu", "machine with internet access")


def test_download_failure_is_one_line(tmp_path, monkeypatch):
  import requests

  def fail(self, *args, **kwargs):
    raise requests.exceptions.ConnectionError("Max retries exceeded with url: /~kriz/cifar-10-binary.tar.gz\n...")

  monkeypatch.setattr(prepare_data, "check_network", lambda *args: None)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  _one_line_error(["--dataset=cifar10", f"--data_dir={tmp_path}"], "ConnectionError", "Max retries",
                  "rerun on a machine with internet access")


def test_check_writable_on_a_remote_file_system(ram_dir):
  from semi_jax import files
  prepare_data.check_writable(f"{ram_dir}/tfds")
  assert files.isdir(f"{ram_dir}/tfds") and files.listdir(f"{ram_dir}/tfds") == []


@pytest.mark.parametrize("name", ["cifar10", "svhn", "imagenet127_64"])
def test_run_without_data_names_the_command(name, tmp_path):
  data = default.get_config().data
  data.name, data.data_dir = name, str(tmp_path)
  with pytest.raises(ValueError) as error:
    datasets.load(data)
  message = str(error.value)
  tfds_name = tfds_sources.TFDS_NAMES[name]
  assert f"TFDS data set {tfds_name!r} is not prepared in the data directory {tmp_path}" in message
  assert f"{COMMAND} --dataset={name} --data_dir={tmp_path}" in message
  assert "download_and_prepare" not in message
  if name.startswith("imagenet"):
    assert "Imagenet64_train_part1_npz.zip" in message and f"{tmp_path}/downloads/manual/" in message


def test_command_quotes_a_data_dir_with_spaces():
  assert tfds_sources.prepare_command("cifar10", "/data/my tfds") == (
      f"{COMMAND} --dataset=cifar10 --data_dir='/data/my tfds'")
