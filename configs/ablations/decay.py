"""Ablation of SeMi's decay schedules: one factor changed from the reference per variant.

  python -m semi_jax.sweep --config=configs/ablations/decay.py --workdir=/tmp/decay
  python -m semi_jax.report --workdir=/tmp/decay
Base: configs/digits_lt_reversed.py (1,000 steps, a few minutes per run on a CPU; `--together` trains all variants
as one program); `:base=digits_lt` for the easier split, `:base=cifar10_lt` for the paper's setting, `:base=test`
for a 3-step smoke test. Values tied to training length (decay interval, threshold
steps) are derived from the base, so the same variants make sense for every base.

  variant           what changes (everything else as in the base)           question
  reference         nothing: bank beta 0.99 constant, decay every d steps   -
                    (digits 25, default 50), linear PLCE ramp 0 -> 1,
                    threshold and miner scale constant
  beta_0.95         bank.beta 0.95                                         does a faster decay help?
  no_decay          bank.beta 1.0: stale entries never lose confidence     is the decay needed at all?
  beta_anneal       bank.beta linear 0.95 -> 0.999 over training          strong decay while features move,
                                                                            weak once they settle
  decay_every_x4    bank.decay_every 4 d (digits 100, default 200),       decay interval
                    counted over the whole run where 4 d does not
                    divide the epoch (bank.decay_clock global)
  ramp_reference    plce.ramp = the reference's epoch / steps_per_epoch    the reference formula (value capped so
                                                                            the ramp stays <= 1 on short bases)
  ramp_constant     plce.ramp constant 1: full mixing right after warm-up  is a ramp needed?
  threshold_step    ssl.threshold * 0.95 every quarter of training        a lowered threshold admits more
                                                                            pseudo-labels (and bank entries) late
  miner_scale_ramp  miner.scale linear 0 -> the base scale                 mining strength grows with training
  weight_decayed_inverse  plce.class_weight decayed_inverse: mixing acts    the paper's "inverse" reading of
                    most on tail classes, its decay by ssl.monitor_df       the class weight (reference: frequency)
  weight_epoch_counts  plce.class_weight_counts epoch: the class weight     per-epoch counts, as the spec
                    from the last epoch's pseudo-labels, not the run's      describes (reference: whole run)

Not swept: the monitor's decay factor ssl.monitor_df (0.9 / 0.99 / 0.999) has no effect with the default
plce.class_weight = "frequency" (the reference's choice); it matters only with a decayed class weight, e.g.
add ("df_0.9", {"plce.class_weight": "decayed_inverse", "ssl.monitor_df.value": 0.9}) next to
weight_decayed_inverse. bank.decay_clock (epoch, the reference's, or global) changes nothing where decay_every
divides steps_per_epoch, as on every base but cifar100_lt and imagenet127; add ("decay_clock_global",
{"bank.decay_clock": "global"}) there.
"""
from configs.ablations import base_config

SEEDS = (0, 1, 2)


def get_config(arg=None):
  return base_config(arg)


def get_sweep(arg=None, config=None):
  """The variants. `config`: the base with the command line's overrides (semi_jax.sweep passes it), from which the
  values tied to training length are derived."""
  config = get_config(arg) if config is None else config
  total, spe = config.train.total_steps, config.train.steps_per_epoch
  interval = config.bank.decay_every.value
  # The reference ramp is epoch / steps_per_epoch; it exceeds 1 when training has more epochs than steps per
  # epoch (short bases only), so its factor is capped to end at 1 there.
  last_epoch = max((total - 1) // spe, 1)
  ramp_value = min(1.0, spe / last_epoch)
  whole_run = {"start_step": 0, "steps": 0, "warmup_steps": 0}  # window = all of training
  return [
      ("reference", {}),
      ("beta_0.95", {"bank.beta.value": 0.95}),
      ("no_decay", {"bank.beta.value": 1.0}),
      ("beta_anneal", {"bank.beta": {"kind": "linear", "value": 0.95, "end_value": 0.999, **whole_run}}),
      # Counted over the whole run where 4 d does not divide the epoch (digits: 100 > 50-step epochs), where the
      # reference's per-epoch counter would never reach it.
      ("decay_every_x4", {"bank.decay_every.value": 4.0 * interval,
                          **({} if spe % (4 * interval) == 0 else {"bank.decay_clock": "global"})}),
      ("ramp_reference", {"plce.ramp": {"kind": "reference_ramp", "value": ramp_value, "warmup_steps": 0}}),
      ("ramp_constant", {"plce.ramp": {"kind": "constant", "value": 1.0, "warmup_steps": 0}}),
      ("threshold_step", {"ssl.threshold": {"kind": "step", "value": config.ssl.threshold.value, "rate": 0.95,
                                            "every": max(total // 4, 1), "start_step": 0, "warmup_steps": 0}}),
      ("miner_scale_ramp", {"miner.scale": {"kind": "linear", "value": 0.0, "end_value": config.miner.scale.value,
                                            **whole_run}}),
      ("weight_decayed_inverse", {"plce.class_weight": "decayed_inverse"}),
      ("weight_epoch_counts", {"plce.class_weight_counts": "epoch"}),
  ]
