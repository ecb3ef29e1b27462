"""`python -m semi_jax.main` with a fault injected into this process's checkpoint reads (multi-process tests).

python tests/fault_main.py KIND --config=... --workdir=...   where KIND is
  transient  the first read of every checkpoint raises an I/O error (a storage hiccup: retried, then read);
  io         every read raises an I/O error (storage unreachable from this host);
  content    the newest checkpoint's content does not match its fingerprint, on this process only.
Retries wait 0.2 s instead of seconds.
"""
import functools
import os
import sys

from absl import app

from semi_jax import checkpointing, config_files, main

KIND = sys.argv.pop(1)
_real_read = checkpointing.Checkpointer._restore_verified
_real_init = checkpointing.Checkpointer.__init__
_attempts = {}
_newest = []  # the newest step at the first read: the one whose content is "damaged"


def _faulty_read(self, step, template):
  _attempts[step] = _attempts.get(step, 0) + 1
  if KIND == "io" or (KIND == "transient" and _attempts[step] == 1):
    raise ConnectionResetError(f"injected: connection reset while reading {self.path(step)}")
  _newest.append(_newest[0] if _newest else max(self.all_steps()))
  if KIND == "content" and step == _newest[0]:
    raise checkpointing.CheckpointContentError("injected: content fingerprint mismatch in 1 of 42 arrays")
  return _real_read(self, step, template)


checkpointing.Checkpointer._restore_verified = _faulty_read
checkpointing.Checkpointer.__init__ = functools.partialmethod(_real_init, retry_delay_s=0.2)

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main.main, flags_parser=lambda argv: config_files.parse_flags(main.FLAGS, argv, "semi_jax"))
