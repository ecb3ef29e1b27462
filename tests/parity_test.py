"""semi_jax against the public PyTorch SeMi code on one fixed batch (tests/data/reference_wrn.npz).

The arrays were produced once by the reference code (tests/data/README.md says how); this test needs only numpy
and semi_jax. Compared, each within 1e-4 unless noted:
- the converted WideResNet-10-2, built both with flax's layers and with the CPU fast paths (`cpu_fast_paths`,
  semi_jax/cpu/): features and both heads' logits in eval and train mode, and the running statistics after one
  train-mode pass (torch's running_var uses the unbiased batch variance, flax's the biased one: the torch value
  is corrected by n / (n - 1) before comparing, n = batch * height * width);
- the SeMi objective of `objective.compute_objective` (Lx, Lx_b, Lu, Lu_b, Lcons, total) after the warm-up, with
  prototype mixing, OHEM weights, a memory bank filled by the reference's own pushes, a non-zero consistency
  centre and the class weights of the reference's frequency monitor; and the state the step hands on (pushed
  candidates, and the consistency centre after `semi_state.update`).

Where semi_jax deliberately differs from the reference (spec, Known bugs), it is set to the reference behaviour:
`ssl.reference_row_order=True` (feature rows of the interleaved batch), `plce.renormalize=False`, the
`reference_ramp` schedule, `plce.class_weight="frequency"`, and a bank whose slots all count as filled (the
reference averages all K slots, empty ones included). Not compared: the bank push and decay themselves (semi_jax
keeps each feature with its own confidence, the reference shifts features and confidences apart) and the
float64 arithmetic of the reference's logit adjustments (semi_jax computes in float32; differences ~1e-6).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from semi_jax import config_validation, convert, memory_bank, objective, semi_state
from semi_jax.models.wide_resnet import WideResNet

TOL = 1e-4
REF = np.load(pathlib.Path(__file__).parent / "data" / "reference_wrn.npz")
SETTING = {k[len("settings/"):]: REF[k] for k in REF.files if k.startswith("settings/")}
B = 8  # labeled images; mu = 1, so 8 images in each unlabeled view


def reference_state_dict(ref=REF):
  """The reference model's tensors in `ref` (an npz of reference arrays): int8 codes times a power-of-two step
  (exactly the float32 values it ran)."""
  sd = {}
  for key in ref.files:
    if key.startswith("state_dict/"):
      name = key[len("state_dict/"):]
      codes = ref[key]
      sd[name] = codes.astype(np.float32) * ref[f"state_dict_step/{name}"] if codes.dtype == np.int8 else codes
  return sd


def reference_inputs():
  """concat(x, u_w, u_s, u_s1) in NHWC."""
  images = np.concatenate([REF[f"inputs/{g}"] for g in ("x", "u_w", "u_s", "u_s1")]).astype(np.float32)
  return (images * REF["inputs/step"]).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def converted():
  variables, report = convert.convert_state_dict(reference_state_dict())
  return variables, report


@pytest.fixture(scope="module", params=[False, True], ids=["flax_layers", "cpu_fast_paths"])
def model(request):
  """The model with flax's Conv / BatchNorm and with the custom CPU layers: both must match the reference."""
  return WideResNet(num_classes=int(SETTING["num_classes"]), depth=int(SETTING["depth"]),
                    width=int(SETTING["width"]), cpu_fast_paths=request.param)


@pytest.fixture(scope="module")
def train_outputs(converted, model):
  variables, _ = converted
  (logits, logits_b, feats), updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, reference_inputs())
  return np.asarray(logits), np.asarray(logits_b), np.asarray(feats), updates["batch_stats"]


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_converter_reads_the_reference_state_dict(converted):
  _, report = converted
  assert report.architecture == convert.Architecture(depth=10, width=2, num_classes=10)
  assert report.ignored_counters == 7
  assert "block2.layer.0.bn1.weight" in report.skipped[0] and "block3.layer.0.bn1.running_var" in report.skipped[0]


def test_eval_mode_outputs_match(converted, model):
  variables, _ = converted
  logits, logits_b, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, reference_inputs())
  assert max_diff(feats, REF["eval/features"]) < TOL
  assert max_diff(logits, REF["eval/logits"]) < TOL
  assert max_diff(logits_b, REF["eval/logits_b"]) < TOL


def test_train_mode_outputs_match(train_outputs):
  logits, logits_b, feats, _ = train_outputs
  assert max_diff(feats, REF["train/features"]) < TOL
  assert max_diff(logits, REF["train/logits"]) < TOL
  assert max_diff(logits_b, REF["train/logits_b"]) < TOL
  # Train mode normalises with the batch statistics: the outputs differ from eval mode.
  assert max_diff(logits, REF["eval/logits"]) > 0.1


def _bn_layers(image_size):
  """(flax path, torch name, values per channel n = batch * H * W) of every BatchNorm semi_jax builds."""
  batch = 4 * B
  side = {1: image_size, 2: image_size // 2, 3: image_size // 4}
  n = (int(SETTING["depth"]) - 4) // 6
  layers = []
  for stage in (1, 2, 3):
    for i in range(n):
      if stage == 1 or i > 0:  # bn1 of the first block of stages 2 and 3 is the discarded one
        layers.append(((f"block{stage}_{i}", "bn1"), f"block{stage}.layer.{i}.bn1", batch * side[stage] ** 2))
      layers.append(((f"block{stage}_{i}", "bn2"), f"block{stage}.layer.{i}.bn2", batch * side[stage] ** 2))
  layers.append((("bn1",), "bn1", batch * side[3] ** 2))
  return layers


def test_running_statistics_after_one_train_step_match(train_outputs):
  *_, batch_stats = train_outputs
  momentum = float(SETTING["bn_momentum_torch"])  # torch's momentum; flax's decay is 1 - momentum
  sd = reference_state_dict()
  layers = _bn_layers(reference_inputs().shape[1])
  assert len(layers) == len(jax.tree.leaves(batch_stats)) // 2
  for path, torch_name, n in layers:
    node = batch_stats
    for part in path:
      node = node[part]
    mean0, var0 = sd[f"{torch_name}.running_mean"], sd[f"{torch_name}.running_var"]
    mean1, var1 = REF[f"train/running/{torch_name}.running_mean"], REF[f"train/running/{torch_name}.running_var"]
    assert max_diff(node["mean"], mean1) < 1e-6, torch_name
    # torch: var1 = (1-m) var0 + m * unbiased; flax: (1-m) var0 + m * biased, biased = unbiased * (n-1)/n.
    expected_var = (1 - momentum) * var0 + (var1 - (1 - momentum) * var0) * (n - 1) / n
    assert max_diff(node["var"], expected_var) < 1e-6, torch_name
    # The updates are ~1e-3 of the values: check the batch statistics they imply, too.
    batch_mean_jax = (np.asarray(node["mean"]) - (1 - momentum) * mean0) / momentum
    batch_mean_ref = (mean1 - (1 - momentum) * mean0) / momentum
    batch_var_jax = (np.asarray(node["var"]) - (1 - momentum) * var0) / momentum
    batch_var_ref = (var1 - (1 - momentum) * var0) / momentum * (n - 1) / n
    assert max_diff(batch_mean_jax, batch_mean_ref) < 1e-3, torch_name
    assert max_diff(batch_var_jax, batch_var_ref) < 1e-3, torch_name
    assert max_diff(batch_var_jax, var0) > 0.01  # the batch really moved the statistics


def reference_config(**overrides):
  """semi_jax set to the reference's behaviour and the settings the reference arrays were made with."""
  c = default.get_config("algo=semi")
  c.model.depth, c.model.width = int(SETTING["depth"]), int(SETTING["width"])
  c.train.batch_size, c.train.mu = B, 1
  c.train.steps_per_epoch = int(SETTING["eval_step"])
  c.train.total_steps = 10 * int(SETTING["eval_step"])
  c.ssl.est_epoch = int(SETTING["est_epoch"])
  c.ssl.threshold = default.schedule_config("constant", value=float(SETTING["threshold"]))
  c.ssl.temperature = float(SETTING["T"])
  c.ssl.tau1, c.ssl.tau12, c.ssl.tau2 = (float(SETTING[k]) for k in ("tau1", "tau12", "tau2"))
  c.ssl.pula = False
  c.ssl.reference_row_order = True
  c.ssl.monitor_df = default.schedule_config("constant", value=float(SETTING["df"]))
  c.miner.mode = "entropy"
  c.miner.scale = default.schedule_config("constant", value=float(SETTING["scale"]))
  c.bank.size = int(SETTING["mb_size"])
  c.plce.alpha, c.plce.tau_tar = float(SETTING["alpha"]), float(SETTING["tau_tar"])
  c.plce.ramp = default.schedule_config("reference_ramp", value=1.0)  # alpha * epoch / eval_step
  c.plce.class_weight = "frequency"
  c.plce.renormalize = False
  c.cons.proto_t, c.cons.weight, c.cons.center_momentum = float(SETTING["proto_t"]), float(SETTING["conswt"]), 0.9
  for path, value in overrides.items():
    section, field = path.split(".")
    c[section][field] = value
  config_validation.validate(c)
  return c


def reference_semi_state(num_classes, feature_dim):
  """The reference's bank (all K slots count, as its prototypes average them all), centre and class weights."""
  bank_feats, bank_conf = REF["bank/memory"], REF["bank/confidences"]
  size = bank_conf.shape[1]
  bank = memory_bank.MemoryBank.from_ranked(bank_feats, bank_conf, np.ones((num_classes, size), bool),
                                            np.zeros((num_classes, size), bool))
  epoch_before = int(SETTING["epoch"]) - 1  # the monitor's weights come from the end of the previous epoch
  class_weight = semi_state.monitor_class_weight(jnp.asarray(REF["semi/label_counts"]), epoch_before,
                                                 float(SETTING["df"]), "frequency")
  semi = semi_state.init(num_classes, feature_dim, size)
  return semi.replace(bank=bank, class_weight=class_weight, qbar=jnp.asarray(REF["semi/qbar"]))


def views(rows):
  """concat(x, u_w, u_s, u_s1) rows (mu = 1: B of each) as the objective's four groups."""
  return objective.Views(*np.split(np.asarray(rows), 4))


def run_objective(train_outputs, **overrides):
  """(total, metrics, aux, SeMi state after the step) of the reference step on the model's train outputs."""
  logits, logits_b, feats, _ = train_outputs
  cfg = reference_config(**overrides)
  step = int(SETTING["epoch"]) * int(SETTING["eval_step"]) + int(SETTING["batch_idx"])
  semi = reference_semi_state(int(SETTING["num_classes"]), feats.shape[1])

  def step_fn(lo, lb, f, y, u_label, s, st):
    total, metrics, aux = objective.compute_objective(lo, lb, f, y, u_label, s, st, cfg, SETTING["py"])
    next_semi, _ = semi_state.update(s, aux, st, cfg)
    return total, metrics, aux, next_semi

  return jax.jit(step_fn)(views(logits), views(logits_b), views(feats), jnp.asarray(REF["inputs/y"], jnp.int32),
                          jnp.full((B,), -1, jnp.int32), semi, jnp.asarray(step, jnp.int32))


LOSS_NAMES = {"Lx": "loss_x", "Lx_b": "loss_x_b", "Lu": "loss_u", "Lu_b": "loss_u_b", "Lcons": "loss_cons",
              "loss": "loss"}


def test_reference_state_feeds_the_objective_as_in_the_reference():
  semi = reference_semi_state(int(SETTING["num_classes"]), 64 * int(SETTING["width"]))
  protos, has_proto = memory_bank.prototypes(semi.bank)
  assert max_diff(protos, REF["step/protos"]) < 1e-6 and bool(jnp.all(has_proto))
  assert max_diff(semi.class_weight, REF["semi/class_weight_inv_base"]) < 1e-6
  # The setting exercises every part: some examples above the threshold and some below, on both heads.
  assert 0 < REF["step/mask_ss_t"].sum() < B and 0 < REF["step/mask_ss_b_h2"].sum() < B
  # Prototype soft labels of the reference's "f(u_s)" rows (rows 2B..3B of the interleaved features).
  targets_pc = objective.prototype_targets(jnp.asarray(REF["step/feature_rows"][2 * B:3 * B]), protos, has_proto,
                                           float(SETTING["tau_tar"]))
  assert max_diff(targets_pc, REF["step/targets_pc"]) < TOL
  assert float(REF["loss/Lcons"]) > 0 and float(REF["loss/Lu"]) > 0


def test_loss_terms_match_the_reference(train_outputs):
  _, metrics, aux, next_semi = run_objective(train_outputs)
  for ref_name, name in LOSS_NAMES.items():
    assert abs(float(metrics[name]) - float(REF[f"loss/{ref_name}"])) < TOL, ref_name
  assert abs(float(metrics["ohem_weight"]) - float(np.mean(REF["step/ohem_weights"]))) < TOL

  # What the step hands to the bank and the consistency centre.
  ref_pl = REF["step/pseudo_label"]
  np.testing.assert_array_equal(np.asarray(aux.target), ref_pl.argmax(1))
  assert max_diff(aux.conf, ref_pl.max(1)) < TOL
  np.testing.assert_array_equal(np.asarray(aux.mask), REF["step/mask_ss_t"] > 0)
  pushed = np.concatenate([np.asarray(f) for f in aux.f_strong])  # semi_state.update pushes both views, conf twice
  assert max_diff(pushed, REF["step/push_features"]) < TOL
  np.testing.assert_array_equal(np.tile(np.asarray(aux.target), 2), REF["step/push_classes"])
  assert max_diff(np.tile(np.asarray(aux.conf), 2), REF["step/push_confidences"]) < TOL
  np.testing.assert_array_equal(np.tile(np.asarray(aux.mask), 2), REF["step/push_mask"] > 0)
  assert max_diff(next_semi.qbar, REF["step/qbar"]) < TOL


def test_feature_rows_follow_the_reference_interleave(train_outputs):
  *_, feats, _ = train_outputs
  assert max_diff(objective.interleave_rows(jnp.asarray(feats), 4), REF["step/feature_rows"]) < TOL


def test_the_reference_switches_matter(train_outputs):
  """semi_jax's own choices (normalised mixed pseudo-labels, each image's own features) change the loss beyond
  the tolerance on this batch, so the comparison above really exercises the reference switches."""
  _, metrics, _, _ = run_objective(train_outputs, **{"plce.renormalize": True})
  assert abs(float(metrics["loss_u"]) - float(REF["loss/Lu"])) > 10 * TOL
  _, metrics, _, _ = run_objective(train_outputs, **{"ssl.reference_row_order": False})
  assert abs(float(metrics["loss_cons"]) - float(REF["loss/Lcons"])) > 10 * TOL
