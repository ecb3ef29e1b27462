"""Which read failures are the storage's (retried, never a reason to move a checkpoint aside) and which are the
checkpoint's content; and the retries themselves."""
import pytest

from semi_jax import checkpointing


def _chained(outer, inner):
  try:
    try:
      raise inner
    except Exception as e:
      raise outer from e
  except Exception as e:
    return e


@pytest.mark.parametrize("error", [
    PermissionError("permission denied"), ConnectionResetError("reset by peer"), TimeoutError("read timed out"),
    OSError(5, "Input/output error"), ValueError("UNAVAILABLE: GCS backend returned 503"),
    RuntimeError("DEADLINE_EXCEEDED while reading gs://b/ckpt/7/state"),
    _chained(ValueError("could not restore"), ConnectionError("connection aborted")),
])
def test_storage_errors_are_io(error):
  assert checkpointing.is_io_error(error)


@pytest.mark.parametrize("error", [
    checkpointing.CheckpointContentError("content fingerprint mismatch in 1 of 3 arrays"),
    FileNotFoundError("no such file: .../state/array_metadatas/process_0"),
    ValueError("DATA_LOSS: truncated file"), KeyError("params"), ValueError("Found incomplete checkpoint"),
    ValueError("Error reading /ckpt/4290/state/503.zarr: checksum mismatch"),
    _chained(ValueError("could not restore"), FileNotFoundError("missing chunk")),
])
def test_content_errors_are_not_io(error):
  assert not checkpointing.is_io_error(error)


class _Flaky(checkpointing.Checkpointer):
  """Only the read loop: `_restore_verified` fails `failures` times with `error`, then returns 'state'."""

  def __init__(self, failures, error, attempts=3):  # no orbax manager: nothing is read from disk
    self.directory, self.calls, self.failures, self.error = "/ckpt", 0, failures, error
    self._read_attempts, self._retry_delay_s = attempts, 0.001

  def _restore_verified(self, step, template):
    self.calls += 1
    if self.calls <= self.failures:
      raise self.error
    return "state"


def test_io_errors_are_retried_then_reported_content_errors_are_not():
  flaky = _Flaky(2, ConnectionResetError("reset"))
  assert flaky._read(7, None) == (checkpointing.OK, "state", "") and flaky.calls == 3
  broken = _Flaky(5, ConnectionResetError("reset"))
  outcome, state, reason = broken._read(7, None)
  assert (outcome, state, broken.calls) == (checkpointing.IO, None, 3) and "ConnectionResetError: reset" in reason
  damaged = _Flaky(5, checkpointing.CheckpointContentError("fingerprint mismatch"))
  assert damaged._read(7, None)[0] == checkpointing.CONTENT and damaged.calls == 1
