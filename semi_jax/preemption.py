"""Stopping at a step boundary on a signal or a preemption notice: the same step on every process."""
from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Whether to stop after a step: the same step on every process.

  One process: SIGTERM and SIGINT set a flag, checked after each step; a second SIGINT stops at once.
  Several processes: JAX's preemption sync manager (started by jax.distributed.initialize) owns SIGTERM. A
  notice on any process (SIGTERM, or on Cloud TPU the maintenance notice) reaches all of them through the
  coordination service, and `Checkpointer.reached_preemption` turns True on every process at the same step,
  so that all save one checkpoint together and exit. SIGINT is forwarded to this process as SIGTERM to take
  the same path. Python handlers installed here are undone on exit; outside the main thread nothing is
  installed (signals can only be caught there).
  """

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._synchronised = jax.process_count() > 1
    self.signum = None
    self._previous = {}

  def _flag(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
      raise KeyboardInterrupt
    self.signum = signum

  def _forward_sigint(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    os.kill(os.getpid(), signal.SIGTERM)  # to the sync manager's handler: spread to every process

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    if not self._synchronised:
      self._previous = {s: signal.signal(s, self._flag) for s in SIGNALS}
    elif jax.config.jax_enable_preemption_service and not callable(signal.getsignal(signal.SIGTERM)):
      # SIGTERM is left to the sync manager's own (C++) handler, which a Python handler would replace.
      self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._forward_sigint)}
    else:
      logging.warning("JAX's preemption service is off (jax_enable_preemption_service) or a Python SIGTERM "
                      "handler replaced its own: a signal to one process stops only that one, without a checkpoint.")
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False

  def reached(self, step: int) -> bool:
    """Call after every step with the number of steps done (the same on every process)."""
    if self._synchronised:
      return self._checkpointer.reached_preemption(step)
    return self.signum is not None
