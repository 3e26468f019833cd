"""A child process of a node that must not outlive it (the daemon, the global scheduler,
the HTTP service, a job's driver): the kernel signals it when its parent dies
(PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1
# loaded once, here: die_with_parent also runs between fork and exec (a preexec_fn),
# where loading a library could deadlock on a lock another thread held at the fork
_LIBC = ctypes.CDLL(None)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig)
