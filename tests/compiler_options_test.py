"""compiler_options: which XLA:CPU options a run's programs get. That they switch oneDNN convolutions on, and
that without them there are none, is checked on the compiled convolutions in tests/conv_test.py."""
import logging

import pytest

from semi_jax.cpu import compiler_options

ONEDNN = "xla_cpu_experimental_onednn_custom_call"
YNN = "xla_cpu_experimental_ynn_fusion_type"
MADE_UP = "xla_cpu_no_such_option_for_tests"


@pytest.mark.parametrize("xla_flags, names", [
    ("", set()),
    ("--xla_force_host_platform_device_count=8 --xla_cpu_experimental_onednn_custom_call=false",
     {"xla_force_host_platform_device_count", ONEDNN}),
    ("--xla_cpu_experimental_ynn_fusion_type=", {YNN}),  # an empty value names the option too
    ("  --xla_dump_hlo_as_text   --xla_dump_to=/tmp/x ", {"xla_dump_hlo_as_text", "xla_dump_to"}),  # bare flag
    ("--flag", {"flag"}),
])
def test_named_in_xla_flags(xla_flags, names):
  assert compiler_options.named_in_xla_flags(xla_flags) == names


def test_no_options_when_the_fast_paths_are_off():
  assert compiler_options.for_run(False) == {}
  assert compiler_options.for_run(False, "") == {}


def test_all_options_on_this_jaxlib_when_on():
  assert compiler_options.for_run(True, "") == compiler_options.OPTIONS
  assert compiler_options.OPTIONS[ONEDNN] is True and compiler_options.OPTIONS[YNN] == ""


@pytest.mark.parametrize("xla_flags, left_out", [
    (f"--{ONEDNN}=false", {ONEDNN}),
    (f"--xla_force_host_platform_device_count=8 --{YNN}=individual_dot", {YNN}),
    (f"--{ONEDNN}=true --{YNN}=", {ONEDNN, YNN}),
])
def test_an_option_named_in_xla_flags_is_left_to_that_setting(xla_flags, left_out):
  want = {name: value for name, value in compiler_options.OPTIONS.items() if name not in left_out}
  assert compiler_options.for_run(True, xla_flags) == want


def test_xla_flags_are_read_from_the_environment_by_default(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=individual_dot")
  assert compiler_options.for_run(True) == {ONEDNN: True}
  monkeypatch.delenv("XLA_FLAGS")
  assert compiler_options.for_run(True) == compiler_options.OPTIONS


def test_supported_is_false_with_a_warning_for_an_option_jaxlib_does_not_know(caplog):
  compiler_options.supported.cache_clear()  # so that this test sees the first try
  with caplog.at_level(logging.WARNING):
    assert compiler_options.supported(MADE_UP, True) is False
  assert any(MADE_UP in record.getMessage() for record in caplog.records), caplog.text
  caplog.clear()
  assert compiler_options.supported(MADE_UP, True) is False  # tried once per process: no second warning
  assert not any(MADE_UP in record.getMessage() for record in caplog.records), caplog.text


@pytest.mark.parametrize("name, value", [(ONEDNN, True), (ONEDNN, False), (YNN, "")])
def test_supported_is_true_for_an_option_jaxlib_knows(name, value):
  assert compiler_options.supported(name, value) is True


def test_an_option_jaxlib_does_not_know_is_left_out(monkeypatch):
  known = dict(compiler_options.OPTIONS)
  monkeypatch.setitem(compiler_options.OPTIONS, MADE_UP, True)
  assert compiler_options.for_run(True, "") == known
