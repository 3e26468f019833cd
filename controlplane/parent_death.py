"""A child process of a node that must not outlive it (the daemon, the global scheduler,
the HTTP service): the kernel signals it when its parent dies (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, sig)
