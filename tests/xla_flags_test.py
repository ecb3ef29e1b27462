import os

from semi_jax import xla_flags


def test_defaults_are_appended_and_a_users_own_setting_wins():
  defaults = "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_custom_call=true"
  assert xla_flags.with_defaults("") == defaults
  assert xla_flags.with_defaults("--xla_force_host_platform_device_count=8") == (
      "--xla_force_host_platform_device_count=8 " + defaults)
  own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  assert xla_flags.with_defaults(own) == own + " --xla_cpu_experimental_onednn_custom_call=true"
  both = "--xla_cpu_experimental_onednn_custom_call=false --xla_cpu_experimental_ynn_fusion_type=individual_dot"
  assert xla_flags.with_defaults(both) == both


def test_importing_semi_jax_applied_them():
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_cpu_experimental_ynn_fusion_type=" in flags
  # tests/conftest.py sets this one itself, and its setting won over the default.
  assert "--xla_cpu_experimental_onednn_custom_call=false" in flags
  assert "--xla_cpu_experimental_onednn_custom_call=true" not in flags
