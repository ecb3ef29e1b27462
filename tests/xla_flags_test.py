import os

from semi_jax import xla_flags


def test_defaults_are_appended_and_a_users_own_setting_wins():
  assert xla_flags.with_defaults("") == "--xla_cpu_experimental_ynn_fusion_type="
  assert xla_flags.with_defaults("--xla_force_host_platform_device_count=8") == (
      "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=")
  own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  assert xla_flags.with_defaults(own) == own


def test_importing_semi_jax_applied_them():
  assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"].split()
