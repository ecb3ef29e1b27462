"""Every configuration field of semi_jax, declared once with the reference (paper) defaults.

Data-set configs import `get_config` and override values only; `configs/*.py` files accept a config argument
`--config=configs/X.py:algo=acr,miner=off,dist=reversed,seed=3` (see `apply_args`).
Schedules (`*.schedule` / `*_schedule` fields) are `semi_jax.schedules.schedule_config` dicts: every decay
schedule of the method is a first-class, ablatable config object.
"""
from __future__ import annotations

import ml_collections

from semi_jax import config_files
from semi_jax.algorithms import COMPONENTS, CUSTOM, preset_mismatch, preset_switches
from semi_jax.schedules import schedule_config


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0  # model init, data split, augmentation and shuffling all derive from it
  config.allow_config_change = False  # resume a workdir whose config.json differs (beyond resume-safe fields)

  # --- data -------------------------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "digits"  # registered source: digits (embedded), cifar10, cifar100, svhn, stl10, imagenet127_32/64
  data.data_dir = ""  # TFDS data directory ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  data.image_size = 32  # side of the (square) images fed to the model
  data.test_per_class = 30  # digits only: balanced held-out test images per class
  # Validation images per class, held out from the labeled training pool before the split (0: none). Evaluated
  # with the test set; semi_jax.report selects the evaluation by validation balanced accuracy.
  data.val_per_class = 0
  data.labeled_max = 1500  # N1: labeled images of the head class
  data.labeled_imb = 100.0  # gamma_l: labeled imbalance ratio (head / tail)
  data.unlabeled_max = 3000  # M1: unlabeled images of the head class
  data.unlabeled_imb = 100.0  # gamma_u: unlabeled imbalance ratio
  data.unlabeled_dist = "consistent"  # consistent | uniform | reversed (ignored with an external unlabeled set)
  data.labeled_fraction = 0.0  # > 0: label this fraction of every class, the rest unlabeled (natural tail)
  data.pad_fraction = 0.125  # weak augmentation: reflect-pad by this fraction of the side, then random crop
  data.randaugment_ops = 2  # strong augmentation: RandAugment ops per image
  data.randaugment_magnitude = 10  # strong augmentation: magnitudes drawn from [1, m)
  data.cutout_fraction = 0.5  # strong augmentation: Cutout square side as a fraction of the image side
  # Where the weak and strong views are made: host (tf.data) | device (inside the jitted train step, from the
  # source images) | auto (device on GPUs, whose hosts have few cores per chip; host elsewhere).
  data.augment_on = "auto"
  data.prefetch = 2  # global batches prepared ahead of the train step

  # --- model ------------------------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  # wide_resnet (WideResNet-depth-width) | resnet (CIFAR-style ResNet, ResNet-50 by default); both have heads fc, fc1
  model.name = "wide_resnet"
  model.depth = 28  # wide_resnet: 6n+4
  model.width = 2  # wide_resnet: widen factor, features D = 64 * width
  model.dropout = 0.0  # wide_resnet: dropout inside the residual blocks (the reference uses 0)
  model.leaky_slope = 0.1  # wide_resnet: negative slope of the LeakyReLU activations (resnet: ReLU)
  model.blocks = (3, 4, 6, 3)  # resnet: residual blocks per stage ((3, 4, 6, 3) bottleneck: ResNet-50)
  model.block = "bottleneck"  # resnet: bottleneck (D = 32 * base_width) | basic (D = 8 * base_width)
  model.base_width = 64  # resnet: channels of the stem and the first stage (doubled at each later stage)
  # Running-average decay of BatchNorm = 1 - PyTorch momentum: 0.999 for the reference WideResNet (its momentum
  # 0.001), 0.9 for its ResNet (torch's default 0.1).
  model.bn_momentum = 0.999
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, BN statistics and losses stay float32)

  # --- training loop ----------------------------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # labeled images per step, global (all devices and hosts)
  train.mu = 1  # unlabeled images per labeled image
  train.total_steps = 250_000  # optimisation steps (the reference: 500 epochs of 500 steps)
  train.steps_per_epoch = 500  # the reference's "eval_step": epoch-based rules (warm-up, monitor) use it
  train.log_every_steps = 100  # training metrics, progress (steps/s, ETA) and the divergence check
  train.eval_every_steps = 500  # test-set evaluation of the EMA weights
  train.checkpoint_every_steps = 5000  # orbax checkpoint interval (and always at the end)
  train.keep_checkpoints = 3  # newest checkpoints kept
  train.eval_batch_size = 256  # global
  train.print_table = True  # print the per-class accuracy table at the end of training
  train.skip_nonfinite_steps = False  # True: a step with NaN/Inf loss or gradients keeps the old state (counted)
  # With skip_nonfinite_steps: a run that skipped more than this share of its last nonfinite_window steps (of all
  # its steps, while it has fewer) stops as diverged.
  train.max_nonfinite_share = 0.5
  train.nonfinite_window = 100

  # --- optimiser ----------------------------------------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 0.03  # peak learning rate of SGD
  optim.momentum = 0.9  # SGD momentum
  optim.nesterov = True  # Nesterov momentum
  optim.weight_decay = 5e-4  # coupled L2 as torch SGD, not on biases / BatchNorm
  optim.lr_schedule = schedule_config("reference_cosine", value=1.0, cycles=7.0 / 16.0)  # factor on lr
  optim.ema_decay = 0.999  # EMA of the weights, used for evaluation

  # --- semi-supervised objective (FixMatch / ACR base) -----------------------------------------------------------
  config.ssl = ssl = ml_collections.ConfigDict()
  # The algorithm: fixmatch|fixmatch_la|acr|semi (the switches below must equal its preset, which `algo=` of the
  # config argument sets) | custom (any switches; component ablations).
  ssl.algo = "semi"
  ssl.dual_head = True  # ACR balanced head fc1 with Lx_b and Lu_b
  ssl.labeled_logit_adjust = False  # FixMatch+LA: logit-adjusted CE (tau2) on the single head's labeled loss
  ssl.threshold = schedule_config("constant", value=0.95)  # pseudo-label confidence threshold
  ssl.temperature = 1.0  # T of the pseudo-label softmax
  ssl.tau1 = 2.0  # logit adjustment of the standard head's pseudo-labels (with pula)
  ssl.tau12 = 2.0  # logit adjustment of the balanced head's pseudo-labels
  ssl.tau2 = 2.0  # logit adjustment of the balanced head's labeled loss
  ssl.pula = False  # standard-head pseudo-labels from logits - tau1 * log(py)
  ssl.est_epoch = 5  # warm-up: mining, prototype mixing and Lcons start after this epoch
  ssl.reference_row_order = False  # reproduce the reference's interleaved feature rows (parity checks only)
  ssl.monitor_df = schedule_config("constant", value=0.99)  # class-weight decay factor df of the monitor

  # --- SeMi components ----------------------------------------------------------------------------------------
  config.miner = miner = ml_collections.ConfigDict()
  miner.enabled = True  # OHEML: weight the unlabeled loss by pseudo-label entropy
  miner.mode = "entropy"  # entropy (paper: H * scale + 1 - scale) | rank (hardest fraction weight 1)
  miner.scale = schedule_config("constant", value=0.75)  # OHEM scale: easy examples weigh 1 - scale
  miner.hard_fraction = 0.5  # rank mode: fraction of the global batch counted as hard

  config.bank = bank = ml_collections.ConfigDict()
  bank.enabled = True  # balanced confidence-decay memory bank (needed by prototype mixing)
  bank.size = 128  # K entries per class
  # Storage dtype of the bank's features: float32 | bfloat16 (half the device memory: [C, K, D] is 133 MB in
  # float32 for ImageNet-127 with ResNet-50, C=127, K=128, D=2048). Confidences and prototypes stay float32.
  bank.dtype = "float32"
  bank.decay_every = schedule_config("constant", value=50.0)  # steps between confidence decays
  bank.beta = schedule_config("constant", value=0.99)  # confidence decay of entries not written since the last
  # When decays happen. epoch: after step i of an epoch with (i + 1) % decay_every == 0, the counter restarting
  # every epoch (the reference's loop; an epoch's last partial interval never decays) | global: every
  # decay_every steps counted over the whole run. Equal when decay_every divides train.steps_per_epoch.
  bank.decay_clock = "epoch"

  config.plce = plce = ml_collections.ConfigDict()
  plce.enabled = True  # mix prototype soft labels from the bank into the pseudo-labels
  plce.alpha = 0.4  # maximum mixing weight
  plce.tau_tar = 0.1  # temperature of softmax(-distance to prototypes)
  plce.ramp = schedule_config("linear", value=0.0, end_value=1.0)  # ramp of the mixing weight, over training
  plce.class_weight = "frequency"  # per-class factor: frequency | decayed_frequency | decayed_inverse | uniform
  # The counts of confident pseudo-labels the factor comes from: run (accumulated over the whole run, as the
  # reference code) | epoch (the last epoch's, as the spec's description).
  plce.class_weight_counts = "run"
  plce.renormalize = True  # rescale mixed pseudo-labels to sum to 1 (the reference does not)

  config.cons = cons = ml_collections.ConfigDict()
  cons.enabled = True  # projection consistency Lcons on unconfident examples
  cons.weight = 0.15  # conswt
  cons.proto_t = 0.1  # temperature; the teacher uses proto_t / 5
  cons.center_momentum = 0.9  # EMA of the centre qbar

  # --- evaluation -------------------------------------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.many_threshold = 100  # many-shot: more than this many labeled images
  ev.few_threshold = 20  # few-shot: fewer than this many labeled images; medium in between

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data_axis_size = -1  # devices on the data axis (-1 = all)

  # --- runs trained together (semi_jax.sweep --together) ------------------------------------------------------
  config.together = together = ml_collections.ConfigDict()
  # How the stacked step batches each run's convolutions: grouped (one grouped convolution for all runs) |
  # per_run (each run's own convolutions, as a run alone computes them) | auto (what measured fastest on the
  # platform; see semi_jax.program.AUTO_CONV).
  together.conv = "auto"
  # GPUs: let the kernels of independent runs overlap (XLA's concurrent command-buffer scheduling) | off | auto.
  together.overlap = "auto"

  # CPU-only speed-ups (semi_jax/cpu/: layers with hand-written gradients, XLA:CPU options, malloc settings):
  # auto = on exactly when the mesh's devices are CPUs | on | off. GPUs and TPUs run flax's layers.
  config.cpu_fast_paths = "auto"

  return apply_args(config, arg)


def apply_algo(config, algo):
  """Sets the component switches of a named algorithm preset."""
  switches = preset_switches(algo)
  config.ssl.algo = algo
  for field, value in switches.items():
    group, name = field.split(".")
    config[group][name] = value
  return config


_SWITCH = {"on": True, "off": False, "1": True, "0": False, "true": True, "false": False}


def apply_args(config, arg):
  """Applies a config argument `key=value,key=value`.

  Keys: algo (preset), miner/bank/plce/cons (on|off), dist (unlabeled distribution), imb (both ratios),
  seed, steps (total steps). A shorter run than the file's also scales the fields tied to the run length (epoch
  length, warm-up, bank decay interval, schedule windows; see semi_jax.config_files.length_tied_values), so that
  `steps=50` of any config file is a valid smoke run; `--config.train.total_steps` does the same through
  `config_files.fit_to_length`.
  """
  if not arg:
    return config
  items = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in arg.split(","))
  if "algo" in items:  # first: component switches may then refine the preset
    apply_algo(config, items.pop("algo"))
  for key, value in items.items():
    if key in COMPONENTS:
      if value.lower() not in _SWITCH:
        raise ValueError(f"config argument {key}={value!r}: use on or off.")
      config[key].enabled = _SWITCH[value.lower()]
      if preset_mismatch(config):  # no longer the named preset: say so rather than train it under that name
        config.ssl.algo = CUSTOM
    elif key == "dist":
      config.data.unlabeled_dist = value
    elif key == "imb":
      config.data.labeled_imb = config.data.unlabeled_imb = float(value)
    elif key == "seed":
      config.seed = int(value)
    elif key == "steps":
      base = config.copy_and_resolve_references()  # the file's values, chosen for its own length
      config.train.total_steps = int(value)
      config_files.fit_lengths(config, base)
    else:
      raise ValueError(f"unknown config argument {key!r}; known: algo, miner, bank, plce, cons, dist, imb, seed, "
                       "steps (e.g. --config=configs/cifar10_lt.py:algo=acr,dist=reversed).")
  return config
