"""Worker process of `semi_jax.tools.bench_reference`: times iterations of the PyTorch reference (pywin/SeMi) on CPU or
on a CUDA GPU.

The driver runs this file as a script with an interpreter that has torch (it imports nothing from semi_jax and
nothing from jax):

  python semi_jax/reference_worker.py --repo=PATH_TO_SeMi_CHECKOUT [--mode=full|core] [--threads=2]
                                     [--device=cpu|cuda]

Protocol: after two warm-up iterations it prints `@ready {json}` (torch version, threads, mode); then, for every
line it reads on stdin, it runs one iteration and prints `@ms <wall milliseconds>`. Other output (the reference's
own prints) carries no `@` prefix and is ignored by the driver.

Modes:
- full: one iteration of the reference's training loop as its `train()` runs it: the body of
  `for batch_idx in range(args.eval_step)` in train_semi.py after the two data-loader reads, taken from that
  file's syntax tree and run as it is written (forward of 64 labeled + 3 x 64 unlabeled images, both heads,
  pseudo-labels, prototype targets, memory-bank push, OHEM weights, the consistency term, backward, SGD,
  LR schedule, EMA update, `.item()` calls, and the bank decay every `decay_step` iterations), with the
  reference's default arguments and past its warm-up epochs (epoch = est_epoch + 1), as `semi_jax.bench` runs
  semi_jax's step.
- core: only the model's forward pass on the same 256 images, cross-entropy on both heads, backward and the SGD
  step: the part of an iteration that the convolutions dominate.

Inputs are random tensors of CIFAR's shapes and dtypes, drawn and moved to the device before the clock starts.
On CUDA the clock stops after `torch.cuda.synchronize()`: an iteration is timed to the end of its last kernel.
"""
from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import time
import types

REFERENCE_FILES = ("train_semi.py", "models/wideresnet.py", "models/ema.py", "utils_sup/memorybank.py",
                   "utils_sup/utils.py")
# The reference's defaults (train_semi.py's argparse) for a CIFAR-10-LT run.
NUM_CLASSES, BATCH, MU, IMAGE = 10, 64, 1, 32
DEFAULT_ARGS = dict(mu=MU, num_classes=NUM_CLASSES, T=1.0, threshold=0.95, use_pc=1, est_epoch=5, alpha=0.0,
                    tau_tar=0.1, eval_step=500, df=0.99, decay_step=50, scale=0.75, proto_t=0.1, conswt=0.15,
                    use_ema=True, pula=0, proto_dim=128, mb_size=128, ema_decay=0.999, lr=0.03, wdecay=5e-4,
                    total_steps=250000, tau1=2.0, tau12=2.0, tau2=2.0, imbalance=100)


def loop_body(source: str) -> tuple[ast.Module, ast.Module]:
  """(module-level helpers interleave/de_interleave, body of train()'s per-batch loop minus the data reads).

  Raises ValueError naming what is missing when `source` is not the reference's train_semi.py.
  """
  tree = ast.parse(source)
  helpers = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("interleave", "de_interleave")]
  train = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"), None)
  loop = None if train is None else next(
      (n for n in ast.walk(train) if isinstance(n, ast.For) and isinstance(n.target, ast.Name)
       and n.target.id == "batch_idx"), None)
  if len(helpers) != 2 or loop is None:
    raise ValueError("train_semi.py: expected module-level interleave() and de_interleave() and a "
                     "`for batch_idx in ...` loop in train(); is --repo a checkout of pywin/SeMi?")
  body = list(loop.body)
  while body and isinstance(body[0], ast.Try):  # `inputs_x, targets_x = labeled_iter.next()` etc.
    body.pop(0)
  if not body:
    raise ValueError("train_semi.py: the per-batch loop in train() has nothing after its data-loader reads.")
  return ast.Module(body=helpers, type_ignores=[]), ast.Module(body=body, type_ignores=[])


def _load(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _stand_in_sklearn() -> None:
  """utils_sup/utils.py imports sklearn.cluster for a helper the loop never calls; register an empty stand-in
  when sklearn is not installed, so the reference loads in a torch-only environment."""
  if importlib.util.find_spec("sklearn") is not None:
    return
  for name in ("sklearn", "sklearn.cluster"):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
  sys.modules["sklearn.cluster"].AgglomerativeClustering = None


class _Meter:
  """Stands in for the reference's AverageMeter (the loop only calls update)."""

  def update(self, *args, **kwargs):
    pass


def build(repo: str, mode: str, threads: int, device: str = "cpu"):
  """Returns (run_one(i), info): the reference model, optimizer, EMA, bank and a closure that runs iteration i."""
  import numpy as np
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  torch.set_num_threads(threads)
  sys.path.insert(0, repo)
  _stand_in_sklearn()
  wideresnet = _load("reference_wideresnet", os.path.join(repo, "models/wideresnet.py"))
  ema = _load("reference_ema", os.path.join(repo, "models/ema.py"))
  bank = _load("reference_memorybank", os.path.join(repo, "utils_sup/memorybank.py"))
  utils = _load("reference_utils", os.path.join(repo, "utils_sup/utils.py"))
  with open(os.path.join(repo, "train_semi.py")) as f:
    helpers, body = loop_body(f.read())

  dev = torch.device(device)
  if dev.type == "cuda" and not torch.cuda.is_available():
    raise SystemExit("reference_worker: --device=cuda but torch sees no CUDA GPU; pass --device=cpu.")
  # The reference's own iteration synchronises at its .item() calls; this makes the end of the clock explicit.
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  args = types.SimpleNamespace(device=dev, **DEFAULT_ARGS)
  counts = np.array([int(5000 * args.imbalance ** (-c / (NUM_CLASSES - 1))) for c in range(NUM_CLASSES)])
  prior = torch.tensor(counts / counts.sum(), dtype=torch.float32, device=dev)
  args.adjustment_l1 = torch.log(prior ** args.tau1 + 1e-12)
  args.adjustment_l12 = torch.log(prior ** args.tau12 + 1e-12)
  args.adjustment_l2 = torch.log(prior ** args.tau2 + 1e-12)

  torch.manual_seed(0)
  model = wideresnet.build_wideresnet(depth=28, widen_factor=2, dropout=0, num_classes=NUM_CLASSES).to(dev).train()
  no_decay = ("bias", "bn")  # as train_semi.py groups them
  groups = [{"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
             "weight_decay": args.wdecay},
            {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
             "weight_decay": 0.0}]
  optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: max(0.0, math.cos(math.pi * 7.0 / 16.0 * step / args.total_steps)))
  scope = {"torch": torch, "F": F, "nn": nn, "np": np, "time": time, "args": args, "model": model,
           "optimizer": optimizer, "scheduler": scheduler, "ema_model": ema.ModelEMA(args, model, args.ema_decay),
           "memory": bank.MemoryBank(classes=NUM_CLASSES, num_feature_per_class=args.mb_size,
                                     feature_dim=args.proto_dim, use_cuda=dev.type == "cuda", device=dev),
           "pc": utils.ProtoClassifier(num_classes=NUM_CLASSES), "update_qbar": utils.update_qbar,
           "probs_monitor_": utils.probs_monitor_, "epoch": args.est_epoch + 1, "epsilon": 1e-8,
           "qbar": torch.zeros(1, args.proto_dim, device=dev), "label_counts": torch.zeros(NUM_CLASSES, device=dev),
           "unlabeled_class_weights": torch.ones(NUM_CLASSES, device=dev),
           "unlabeled_class_weights_inv_base": torch.ones(NUM_CLASSES, device=dev), "end": time.time(),
           **{name: _Meter() for name in ("data_time", "batch_time", "losses", "losses_x", "losses_u",
                                          "mask_probs")}}
  exec(compile(helpers, "train_semi.py", "exec"), scope)
  iteration = compile(body, "train_semi.py", "exec")

  def batch(i):
    gen = torch.Generator().manual_seed(i % 2)
    images = lambda: torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
    labels = lambda: torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    return {k: v.to(dev) for k, v in (("inputs_x", images()), ("targets_x", labels()), ("inputs_u_w", images()),
                                      ("inputs_u_s", images()), ("inputs_u_s1", images()), ("u_real", labels()))}

  def core():
    x = torch.cat([scope["inputs_x"], scope["inputs_u_w"], scope["inputs_u_s"], scope["inputs_u_s1"]])
    y = torch.cat([scope["targets_x"]] * (1 + 3 * MU))
    features = model(x)
    loss = F.cross_entropy(model.classify(features), y) + F.cross_entropy(model.classify1(features), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  def run_one(i: int) -> float:
    scope.update(batch(i))
    scope["batch_idx"] = i % (args.eval_step - 1)  # never the epoch's last batch (it prints class weights)
    sync()
    start = time.perf_counter()
    if mode == "full":
      exec(iteration, scope)
    else:
      core()
    sync()
    return 1000.0 * (time.perf_counter() - start)

  info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "mode": mode, "device": str(dev)}
  if dev.type == "cuda":
    info["gpu"] = torch.cuda.get_device_name(dev)
  return run_one, info


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repo", required=True, help="checkout of the reference code (pywin/SeMi)")
  parser.add_argument("--mode", choices=("full", "core"), default="full")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch runs the iteration")
  args = parser.parse_args(argv)
  missing = [f for f in REFERENCE_FILES if not os.path.isfile(os.path.join(args.repo, f))]
  if missing:
    raise SystemExit(f"reference_worker: {args.repo} lacks {', '.join(missing)}; pass a checkout of pywin/SeMi.")
  run_one, info = build(args.repo, args.mode, args.threads, args.device)
  for i in range(2):
    run_one(i)
  print("@ready " + json.dumps(info), flush=True)
  for i, _ in enumerate(sys.stdin, start=2):
    print(f"@ms {run_one(i):.3f}", flush=True)


if __name__ == "__main__":
  main()
