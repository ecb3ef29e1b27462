"""Import PyTorch WideResNet and ResNet checkpoints (SeMi, ACR, FixMatch) as semi_jax variables.

    python -m semi_jax.convert IN OUT [--which auto|ema|model] [--missing-fc1 copy|error] [--allow-unexpected]

IN is a PyTorch checkpoint (`.pth` / `.pth.tar`: a state_dict, or a dict wrapping one as
`{'state_dict': ..., 'ema_state_dict': ...}` the way the reference training scripts save it, keys possibly
prefixed with `module.` by DataParallel) or an `.npz` of the state_dict's arrays (name -> array). OUT is an
`.npz` of the flax variables with flattened keys `params/...` and `batch_stats/...`; `load_variables(OUT)`
gives them back as `{'params': ..., 'batch_stats': ...}` for the flax model the report names (`WideResNet(num_classes,
depth, width)` or `ResNet(num_classes, blocks, block, base_width)`; `Architecture.model()` builds it).

Reading `.pth` files does not need torch: when torch is installed it is used (`weights_only` loading); without
it, a built-in reader of the zip format (torch >= 1.6) rebuilds the tensors as numpy arrays and refuses every
pickled object other than tensors, containers and numbers. The legacy pre-1.6 format needs torch.

What the conversion does:
- tells the reference's WideResNet (`block1.layer.0.*`) from its CIFAR-style ResNet (`layer1.0.*`, ResNet-50 for
  ImageNet-127); infers depth and width, or the blocks per stage, the block kind and the base width, the number of
  classes and input channels from the tensor shapes, and checks every tensor the flax model needs is present with
  the right shape (a missing one is an error naming it);
- Conv2d weights OIHW -> HWIO, Linear (out, in) -> (in, out), BatchNorm weight/bias -> params scale/bias and
  running_mean/running_var -> batch_stats mean/var;
- skips, with a note, the WideResNet's BatchNorm `bn1` of the first block of stages 2 and 3 (the reference computes
  and discards it, and the flax model does not build it) and the ResNet's rotation head `rot` (built, never trained
  or read by SeMi); ignores `num_batches_tracked` (flax keeps no counter);
- any other tensor is unexpected: an error naming it, or with `allow_unexpected` a skip naming it;
- a checkpoint with only the standard head `fc` (FixMatch) gets the balanced head `fc1` as a copy of `fc`, with
  a warning: both heads then start equal, a valid start for fine-tuning ACR/SeMi, and evaluation of `fc1` equals
  that of `fc`. `missing_fc1="error"` refuses such a checkpoint instead.

Running variances are copied as they are. After conversion they keep being updated slightly differently:
torch averages in the unbiased batch variance, flax the biased one, a factor (n - 1) / n apart (n = batch *
height * width, so a relative 1/(n - 1), weighted by the torch momentum (0.001 WideResNet, 0.1 ResNet), per step).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_BN_TENSORS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


@dataclasses.dataclass(frozen=True)
class Architecture:
  depth: int
  width: int
  num_classes: int
  in_channels: int = 3

  @property
  def feature_dim(self) -> int:
    return 64 * self.width

  def describe(self) -> str:
    return (f"WideResNet-{self.depth}-{self.width}, {self.num_classes} classes, feature dim {self.feature_dim}, "
            f"{self.in_channels} input channels")

  def model(self):
    from semi_jax.models.wide_resnet import WideResNet  # pylint: disable=import-outside-toplevel
    return WideResNet(num_classes=self.num_classes, depth=self.depth, width=self.width)


_RESNET_NAMES = {("basic", (2, 2, 2, 2)): "ResNet-18", ("basic", (3, 4, 6, 3)): "ResNet-34",
                 ("bottleneck", (3, 4, 6, 3)): "ResNet-50", ("bottleneck", (3, 4, 23, 3)): "ResNet-101",
                 ("bottleneck", (3, 8, 36, 3)): "ResNet-152"}


@dataclasses.dataclass(frozen=True)
class ResNetArchitecture:
  blocks: tuple[int, ...]
  block: str  # bottleneck | basic
  base_width: int
  num_classes: int
  in_channels: int = 3

  @property
  def expansion(self) -> int:
    from semi_jax.models.resnet import EXPANSION  # pylint: disable=import-outside-toplevel
    return EXPANSION[self.block]

  @property
  def feature_dim(self) -> int:
    return 8 * self.base_width * self.expansion

  def describe(self) -> str:
    name = _RESNET_NAMES.get((self.block, self.blocks), "ResNet") if self.base_width == 64 else "ResNet"
    return (f"{name} ({self.block} blocks {self.blocks}, base width {self.base_width}), {self.num_classes} classes, "
            f"feature dim {self.feature_dim}, {self.in_channels} input channels")

  def model(self):
    from semi_jax.models.resnet import ResNet  # pylint: disable=import-outside-toplevel
    return ResNet(num_classes=self.num_classes, blocks=self.blocks, block=self.block, base_width=self.base_width)


@dataclasses.dataclass
class ConversionReport:
  architecture: Architecture | ResNetArchitecture
  source: str = "state_dict"
  stripped_prefix: str = ""
  converted: int = 0
  parameter_count: int = 0
  skipped: list[str] = dataclasses.field(default_factory=list)
  ignored_counters: int = 0
  warnings: list[str] = dataclasses.field(default_factory=list)

  def lines(self) -> list[str]:
    source = self.source + (f" (prefix {self.stripped_prefix!r} stripped)" if self.stripped_prefix else "")
    out = [f"source: {source}", f"architecture: {self.architecture.describe()}",
           f"converted: {self.converted} tensors, {self.parameter_count:,} parameters"]
    out += [f"skipped: {s}" for s in self.skipped]
    if self.ignored_counters:
      out.append(f"ignored: {self.ignored_counters} num_batches_tracked counters (flax BatchNorm keeps none)")
    out += [f"warning: {w}" for w in self.warnings]
    return out


# --- reading files ------------------------------------------------------------------------------------------


def read_checkpoint(path, reader: str = "auto") -> Any:
  """Loads IN: a dict of numpy arrays for an .npz, the unpickled object (tensors as numpy arrays) for a .pth.

  reader: "auto" (torch if installed, else the built-in zip reader), "torch" or "builtin".
  """
  if reader not in ("auto", "torch", "builtin"):
    raise ValueError(f"reader must be auto, torch or builtin, got {reader!r}.")
  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError as e:
    raise ValueError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}.") from None
  if not head:
    raise ValueError(f"checkpoint {str(path)!r} is empty; pass a .pth checkpoint or an .npz of its arrays.")
  names = _zip_names(path)
  if names is not None and names and all(n.endswith(".npy") for n in names):
    return _read_npz(path)
  is_torch_zip = names is not None and any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)
  torch = _import_torch() if reader in ("auto", "torch") else None
  if reader == "torch" and torch is None:
    raise ValueError("reader='torch' needs torch, which is not installed; use reader='builtin' or 'auto'.")
  if torch is not None:
    return _read_with_torch(torch, path)
  if is_torch_zip:
    return _read_torch_zip(path)
  if names is not None:
    raise ValueError(f"{str(path)!r} is a zip archive but neither a PyTorch checkpoint (no data.pkl) nor an .npz "
                     "of arrays; pass a .pth checkpoint or an .npz of its state_dict arrays.")
  raise ValueError(f"{str(path)!r} is neither an .npz nor a zip-format PyTorch checkpoint. A legacy (torch < 1.6) "
                   ".pth needs torch installed to be read; otherwise the file is not a checkpoint or is corrupt.")


def _zip_names(path):
  if not zipfile.is_zipfile(path):
    return None
  try:
    with zipfile.ZipFile(path) as zf:
      return zf.namelist()
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{str(path)!r} is a corrupt zip archive ({e}); re-export the checkpoint.") from None


def _read_npz(path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"cannot read the arrays of {str(path)!r} ({e}); it must be an .npz of plain numeric arrays "
                     "(name -> array), without pickled objects.") from None


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return torch


def _read_with_torch(torch, path):
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(f"torch refused to load {str(path)!r} as weights only ({str(e).splitlines()[0]}); save just "
                     "the state_dict (torch.save(model.state_dict(), ...)) and convert that.") from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise ValueError(f"torch cannot read {str(path)!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                     "the file is not a checkpoint or is corrupt.") from None
  return _tensors_to_numpy(torch, obj)


def _tensors_to_numpy(torch, obj):
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
  if isinstance(obj, Mapping):
    return {k: _tensors_to_numpy(torch, v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_tensors_to_numpy(torch, v) for v in obj)
  return obj


# The built-in reader: torch's zip format is a pickle (data.pkl) whose tensors point at raw storages stored
# as separate zip members (data/<key>). Only the globals below may appear in the pickle.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: str


def _numpy_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(size), tuple(stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise pickle.UnpicklingError(f"tensor of shape {size} reaches past its storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * storage.itemsize for s in stride))
  return np.array(view, copy=True)


def _rebuild_parameter(data, *unused):
  del unused
  return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): lambda text, encoding="utf-8": text.encode(encoding),
}


class _CheckpointUnpickler(pickle.Unpickler):

  def __init__(self, data: bytes, load_storage):
    super().__init__(io.BytesIO(data))
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"the checkpoint pickles {module}.{name}, which the built-in reader does not load")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unknown persistent record {pid!r}")
    return self._load_storage(pid[1].dtype, str(pid[2]), int(pid[4]))


def _read_torch_zip(path):
  try:
    with zipfile.ZipFile(path) as zf:
      names = set(zf.namelist())
      pickle_name = next(n for n in sorted(names) if n == "data.pkl" or n.endswith("/data.pkl"))
      prefix = pickle_name[: -len("data.pkl")]
      order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
      storages = {}

      def load_storage(dtype_name, key, numel):
        if key not in storages:
          dtype = _numpy_dtype(dtype_name).newbyteorder("<" if order == "little" else ">")
          raw = zf.read(f"{prefix}data/{key}")
          if len(raw) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, fewer than {numel} {dtype_name}")
          storages[key] = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))
        return storages[key]

      return _CheckpointUnpickler(zf.read(pickle_name), load_storage).load()
  except (pickle.UnpicklingError, KeyError, EOFError, zipfile.BadZipFile, ValueError, TypeError) as e:
    raise ValueError(f"cannot read the PyTorch checkpoint {str(path)!r} without torch: {e}. Install torch to read "
                     "it, or save just the state_dict (or an .npz of its arrays) and convert that.") from None


# --- picking and checking the state_dict ---------------------------------------------------------------------


def select_state_dict(checkpoint, which: str = "auto") -> tuple[dict[str, np.ndarray], str]:
  """The state_dict inside a loaded checkpoint, and where it came from.

  which: "auto" (the EMA weights when the checkpoint has them, as the reference evaluates, else the model's),
  "ema" (`ema_state_dict`) or "model" (`state_dict`). A flat name -> array mapping is used as it is.
  """
  if which not in ("auto", "ema", "model"):
    raise ValueError(f"which must be auto, ema or model, got {which!r}.")
  if not isinstance(checkpoint, Mapping) or not checkpoint:
    raise ValueError(f"the checkpoint holds a {type(checkpoint).__name__}, not a state_dict (a non-empty "
                     "name -> tensor mapping) nor a dict with 'state_dict' / 'ema_state_dict'.")
  wrapped = any(k in checkpoint for k in ("state_dict", "ema_state_dict"))
  if not wrapped:
    if not all(_is_array(v) for v in checkpoint.values()):
      raise ValueError(f"the checkpoint is a dict with keys {sorted(map(str, checkpoint))[:8]} that is neither a "
                       "state_dict (all values tensors) nor a wrapper with 'state_dict' / 'ema_state_dict'.")
    return _as_arrays(checkpoint, "state_dict"), "state_dict"
  ema = checkpoint.get("ema_state_dict")
  key = {"ema": "ema_state_dict", "model": "state_dict"}.get(which, "ema_state_dict" if ema is not None
                                                                 else "state_dict")
  if checkpoint.get(key) is None:
    present = sorted(k for k in ("state_dict", "ema_state_dict") if checkpoint.get(k) is not None)
    raise ValueError(f"the checkpoint has no {key!r} (it has {present}); pick another with which=.")
  return _as_arrays(checkpoint[key], key), key


def _as_arrays(state_dict, where) -> dict[str, np.ndarray]:
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{where} is a {type(state_dict).__name__}, not a name -> tensor mapping.")
  bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not _is_array(v)]
  if bad:
    raise ValueError(f"{where} has entries that are not tensors: {bad[:5]}; it must map names to tensors.")
  return {k: np.asarray(v) for k, v in state_dict.items()}


def _is_array(value) -> bool:
  """numpy arrays and anything numpy can read as one without copying objects (torch CPU tensors, jax arrays)."""
  return isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__")


def strip_wrapper_prefix(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """Removes `module.` (DataParallel) / `_orig_mod.` (torch.compile) prefixes that every key carries."""
  stripped = ""
  state_dict = dict(state_dict)
  while True:
    prefix = next((p for p in WRAPPER_PREFIXES if state_dict and all(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
      return state_dict, stripped
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    stripped += prefix


def infer_architecture(state_dict: Mapping[str, np.ndarray]) -> Architecture | ResNetArchitecture:
  """The architecture of a (prefix-free) WideResNet or ResNet state_dict: for a WideResNet its depth and width,
  for a ResNet its blocks per stage, block kind and base width; the number of classes and input channels."""
  if "layer1.0.conv1.weight" in state_dict:
    return _infer_resnet(state_dict)
  for name in ("conv1.weight", "block1.layer.0.conv1.weight", "fc.weight"):
    if name not in state_dict:
      sample = sorted(state_dict)[:6]
      raise ValueError(f"not a WideResNet or ResNet state_dict: {name!r} is missing (keys start with {sample}); "
                       "expected the FixMatch/ACR/SeMi WideResNet naming conv1, block{1,2,3}.layer.{i}.*, bn1, fc, "
                       "fc1, or the ResNet naming conv1, bn1, layer{1,2,3,4}.{i}.*, fc, fc1.")
  blocks = _stage_blocks(state_dict, "block{stage}.layer", (1, 2, 3))
  if len(set(blocks.values())) != 1:
    raise ValueError(f"stages have different block counts {blocks}; a WideResNet has n blocks in each stage.")
  n = blocks[1]
  stem = state_dict["conv1.weight"]
  first = state_dict["block1.layer.0.conv1.weight"]
  fc = state_dict["fc.weight"]
  if stem.ndim != 4 or stem.shape[0] != 16:
    raise ValueError(f"conv1.weight has shape {stem.shape}; a WideResNet stem is a [16, C_in, 3, 3] convolution.")
  if first.ndim != 4 or first.shape[0] % 16:
    raise ValueError(f"block1.layer.0.conv1.weight has shape {first.shape}; expected [16 * width, 16, 3, 3].")
  width = first.shape[0] // 16
  if fc.ndim != 2 or fc.shape[1] != 64 * width:
    raise ValueError(f"fc.weight has shape {fc.shape}; with width {width} (from block1) it must be "
                     f"[num_classes, {64 * width}].")
  return Architecture(depth=6 * n + 4, width=width, num_classes=fc.shape[0], in_channels=stem.shape[1])


def _stage_blocks(state_dict, prefix: str, stages) -> dict[int, int]:
  """Blocks per stage, counted from the keys `<prefix with the stage>.<block index>.*`."""
  blocks = {}
  for stage in stages:
    name = prefix.format(stage=stage)
    regex = re.compile(re.escape(name) + r"\.(\d+)\.")
    idx = sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})
    if idx != list(range(len(idx))) or not idx:
      raise ValueError(f"stage {name} has layers {idx}; expected 0..n-1 with n >= 1 in every stage.")
    blocks[stage] = len(idx)
  return blocks


def _infer_resnet(state_dict) -> ResNetArchitecture:
  for name in ("conv1.weight", "fc.weight"):
    if name not in state_dict:
      raise ValueError(f"not a ResNet state_dict: {name!r} is missing; expected the reference ResNet naming conv1, "
                       "bn1, layer{1,2,3,4}.{i}.*, fc, fc1.")
  blocks = tuple(_stage_blocks(state_dict, "layer{stage}", (1, 2, 3, 4)).values())
  block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
  stem, fc = state_dict["conv1.weight"], state_dict["fc.weight"]
  if stem.ndim != 4 or stem.shape[2:] != (3, 3):
    raise ValueError(f"conv1.weight has shape {stem.shape}; the reference ResNet's stem is a [64, C_in, 3, 3] "
                     "convolution (a 7x7 ImageNet stem is a different architecture).")
  arch = ResNetArchitecture(blocks=blocks, block=block, base_width=stem.shape[0], num_classes=fc.shape[0],
                            in_channels=stem.shape[1])
  if fc.ndim != 2 or fc.shape[1] != arch.feature_dim:
    raise ValueError(f"fc.weight has shape {fc.shape}; with {block} blocks and base width {arch.base_width} (from "
                     f"conv1) it must be [num_classes, {arch.feature_dim}].")
  return arch


def _block_layout(arch: Architecture):
  """(torch prefix, flax name, equal_in_out, uses_bn1) for every residual block."""
  n = (arch.depth - 4) // 6
  channels = (16, 16 * arch.width, 32 * arch.width, 64 * arch.width)
  for stage in (1, 2, 3):
    for i in range(n):
      c_in = channels[stage - 1] if i == 0 else channels[stage]
      equal = c_in == channels[stage]
      yield f"block{stage}.layer.{i}", f"block{stage}_{i}", equal, equal or stage == 1


def torch_to_flax_names(arch: Architecture | ResNetArchitecture) -> dict[str, tuple[tuple[str, ...], str]]:
  """torch tensor name -> (flax variable path, kind) of every tensor the flax model is built from.

  kind is "conv", "dense" or "copy" and says how the array is laid out.
  """
  names = {}

  def conv(torch_name, path):
    names[f"{torch_name}.weight"] = (("params",) + path + ("kernel",), "conv")

  def bn(torch_name, path):
    for tensor, (collection, leaf) in _BN_TENSORS.items():
      names[f"{torch_name}.{tensor}"] = ((collection,) + path + (leaf,), "copy")

  conv("conv1", ("conv1",))
  if isinstance(arch, ResNetArchitecture):
    bn("bn1", ("bn1",))
    for torch_prefix, flax_name, layers, has_shortcut in _resnet_block_layout(arch):
      for i in range(1, layers + 1):
        conv(f"{torch_prefix}.conv{i}", (flax_name, f"conv{i}"))
        bn(f"{torch_prefix}.bn{i}", (flax_name, f"bn{i}"))
      if has_shortcut:  # nn.Sequential(Conv2d, BatchNorm2d)
        conv(f"{torch_prefix}.shortcut.0", (flax_name, "shortcut_conv"))
        bn(f"{torch_prefix}.shortcut.1", (flax_name, "shortcut_bn"))
  else:
    for torch_prefix, flax_name, equal, uses_bn1 in _block_layout(arch):
      if uses_bn1:
        bn(f"{torch_prefix}.bn1", (flax_name, "bn1"))
      conv(f"{torch_prefix}.conv1", (flax_name, "conv1"))
      bn(f"{torch_prefix}.bn2", (flax_name, "bn2"))
      conv(f"{torch_prefix}.conv2", (flax_name, "conv2"))
      if not equal:
        conv(f"{torch_prefix}.convShortcut", (flax_name, "shortcut"))
    bn("bn1", ("bn1",))
  for head in ("fc", "fc1"):
    names[f"{head}.weight"] = (("params", head, "kernel"), "dense")
    names[f"{head}.bias"] = (("params", head, "bias"), "copy")
  return names


def _resnet_block_layout(arch: ResNetArchitecture):
  """(torch prefix, flax name, convolutions, has a shortcut convolution) for every residual block."""
  from semi_jax.models.resnet import STAGE_STRIDES  # pylint: disable=import-outside-toplevel
  c_in = arch.base_width
  for stage, (count, stride) in enumerate(zip(arch.blocks, STAGE_STRIDES), start=1):
    c_out = arch.base_width * 2 ** (stage - 1) * arch.expansion
    for i in range(count):
      yield (f"layer{stage}.{i}", f"layer{stage}_{i}", 3 if arch.block == "bottleneck" else 2,
             (stride if i == 0 else 1) != 1 or c_in != c_out)
      c_in = c_out


def discarded_bn_names(arch: Architecture) -> list[str]:
  """BatchNorm tensors the reference computes and discards (first block of stages 2 and 3); not converted."""
  return [f"{prefix}.bn1.{t}" for prefix, _, _, uses_bn1 in _block_layout(arch) if not uses_bn1
          for t in _BN_TENSORS]


def skipped_names(arch: Architecture | ResNetArchitecture) -> tuple[list[str], str]:
  """Tensors of the reference model that the flax model does not build, and why: the WideResNet's discarded
  BatchNorms, the ResNet's rotation head."""
  if isinstance(arch, ResNetArchitecture):
    return ["rot.weight", "rot.bias"], "the rotation head the reference builds and SeMi never trains or reads"
  return discarded_bn_names(arch), "BatchNorm the reference computes and discards; not built"


# --- conversion ------------------------------------------------------------------------------------------------


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *, missing_fc1: str = "copy",
                       allow_unexpected: bool = False) -> tuple[dict[str, Any], ConversionReport]:
  """A torch WideResNet or ResNet state_dict (name -> array) as flax variables {'params': ..., 'batch_stats': ...}."""
  if missing_fc1 not in ("copy", "error"):
    raise ValueError(f"missing_fc1 must be copy or error, got {missing_fc1!r}.")
  state_dict, prefix = strip_wrapper_prefix(_as_arrays(state_dict, "state_dict"))
  arch = infer_architecture(state_dict)
  report = ConversionReport(architecture=arch, stripped_prefix=prefix)
  wanted = torch_to_flax_names(arch)
  state_dict = dict(state_dict)

  if "fc1.weight" not in state_dict and "fc1.bias" not in state_dict:
    if missing_fc1 == "error":
      raise ValueError("the checkpoint has no balanced head fc1 (a FixMatch model); pass missing_fc1='copy' "
                       "(--missing-fc1 copy) to start fc1 as a copy of fc.")
    message = "no balanced head fc1 in the checkpoint (FixMatch model): fc1 is a copy of fc"
    warnings.warn(message, UserWarning, stacklevel=2)
    report.warnings.append(message)
    state_dict.update({f"fc1.{t}": state_dict[f"fc.{t}"] for t in ("weight", "bias") if f"fc.{t}" in state_dict})

  missing = sorted(k for k in wanted if k not in state_dict)
  if missing:
    raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) that {arch.describe()} needs: "
                     f"{', '.join(missing)}.")
  skippable, why_skipped = skipped_names(arch)
  discarded = [k for k in skippable if k in state_dict]
  counters = [k for k in state_dict if k.endswith(".num_batches_tracked") or k == "num_batches_tracked"]
  unexpected = sorted(set(state_dict) - set(wanted) - set(discarded) - set(counters))
  if unexpected and not allow_unexpected:
    raise ValueError(f"the checkpoint has {len(unexpected)} tensor(s) that {arch.describe()} does not use: "
                     f"{', '.join(unexpected)}. Pass allow_unexpected=True (--allow-unexpected) to skip them.")
  if discarded:
    report.skipped.append(f"{', '.join(discarded)} ({why_skipped})")
  if unexpected:
    report.skipped.append(f"{', '.join(unexpected)} (unexpected, skipped as asked)")
  report.ignored_counters = len(counters)

  variables = {"params": {}, "batch_stats": {}}
  for torch_name, (path, kind) in wanted.items():
    array = _to_flax_layout(torch_name, state_dict[torch_name], kind)
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = array
  _check_against_model(variables, arch)
  report.converted = len(wanted)
  report.parameter_count = int(sum(a.size for a in _leaves(variables["params"])))
  return variables, report


def _to_flax_layout(name: str, array: np.ndarray, kind: str) -> np.ndarray:
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
    raise ValueError(f"tensor {name!r} has dtype {array.dtype}; expected floating point weights.")
  array = np.asarray(array, np.float32)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"tensor {name!r} contains NaN or infinite values; the checkpoint is corrupt or diverged.")
  if kind == "conv":
    if array.ndim != 4:
      raise ValueError(f"tensor {name!r} has shape {array.shape}; a Conv2d weight is [out, in, kh, kw].")
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  if kind == "dense":
    if array.ndim != 2:
      raise ValueError(f"tensor {name!r} has shape {array.shape}; a Linear weight is [out, in].")
    return np.ascontiguousarray(array.T)
  return array


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


def _check_against_model(variables, arch: Architecture | ResNetArchitecture) -> None:
  """Every converted array must have the name and shape that the flax model initialises."""
  import jax  # pylint: disable=import-outside-toplevel  (keeps `read_checkpoint` usable without jax start-up)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  model = arch.model()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, arch.in_channels)),
                                             train=False))
  expected = {k: tuple(v.shape) for k, v in flatten_variables(shapes).items()}
  got = {k: tuple(v.shape) for k, v in flatten_variables(variables).items()}
  wrong = sorted(f"{k}: model {expected.get(k)}, converted {got.get(k)}"
                 for k in set(expected) | set(got) if expected.get(k) != got.get(k))
  if wrong:
    raise ValueError(f"converted tensors do not fit the flax {type(model).__name__} (wrong shape for the inferred "
                     "architecture): " + "; ".join(wrong[:10]))


def convert_checkpoint(path, *, which: str = "auto", missing_fc1: str = "copy", allow_unexpected: bool = False,
                       reader: str = "auto") -> tuple[dict[str, Any], ConversionReport]:
  """Reads IN (.pth or .npz) and converts the chosen state_dict; see `convert_state_dict`."""
  state_dict, source = select_state_dict(read_checkpoint(path, reader=reader), which)
  variables, report = convert_state_dict(state_dict, missing_fc1=missing_fc1, allow_unexpected=allow_unexpected)
  report.source = source
  return variables, report


# --- the flax-side file ---------------------------------------------------------------------------------------


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'params': {'fc': {'kernel': a}}} -> {'params/fc/kernel': a} (works on any nested mapping)."""
  flat = {}

  def walk(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    else:
      flat[prefix] = node

  walk("", variables)
  return flat


def save_variables(variables: Mapping[str, Any], path) -> None:
  """Writes OUT: an .npz with one array per flattened `params/...` and `batch_stats/...` key."""
  flat = {k: np.asarray(v) for k, v in flatten_variables(variables).items()}
  with open(path, "wb") as f:
    np.savez(f, **flat)


def load_variables(path) -> dict[str, Any]:
  """Reads a file written by `save_variables` / the CLI as {'params': ..., 'batch_stats': ...} of numpy arrays."""
  flat = _read_npz(path) if _zip_names(path) is not None else None
  if flat is None:
    raise ValueError(f"{str(path)!r} is not an .npz of flax variables; write one with python -m semi_jax.convert.")
  bad = sorted(k for k in flat if not k.startswith(("params/", "batch_stats/")))
  if bad or not any(k.startswith("params/") for k in flat):
    raise ValueError(f"{str(path)!r} is not an .npz of flax variables: expected 'params/...' and 'batch_stats/...' "
                     f"keys, found {bad[:5] or sorted(flat)[:5]}.")
  variables = {"params": {}, "batch_stats": {}}
  for key, array in flat.items():
    *parents, leaf = key.split("/")
    node = variables
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = array
  return variables


# --- command line -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m semi_jax.convert",
      description="Convert a PyTorch SeMi/ACR/FixMatch WideResNet or ResNet checkpoint into semi_jax flax variables.")
  parser.add_argument("input", help="checkpoint: .pth/.pth.tar (state_dict or wrapped), or .npz of its arrays")
  parser.add_argument("output", help="output .npz with 'params/...' and 'batch_stats/...' arrays")
  parser.add_argument("--which", choices=("auto", "ema", "model"), default="auto",
                      help="in a wrapped checkpoint: the EMA weights (auto: when present) or the model's")
  parser.add_argument("--missing-fc1", choices=("copy", "error"), default="copy",
                      help="a checkpoint without the balanced head fc1: start it as a copy of fc, or refuse")
  parser.add_argument("--allow-unexpected", action="store_true",
                      help="skip (and name) tensors the model does not use instead of failing")
  args = parser.parse_args(argv)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # the report lists the warnings
      variables, report = convert_checkpoint(args.input, which=args.which, missing_fc1=args.missing_fc1,
                                             allow_unexpected=args.allow_unexpected)
    save_variables(variables, args.output)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for line in report.lines():
    print(line)
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
