"""Keep vLLM's engine processes out of the server's process group.

A terminal's Ctrl-C (and a supervisor's process-group SIGTERM) reaches every process of the
group; vLLM's workers exit at once on it, which would abort requests the server is still
draining. ``detach_engine_core`` runs inside vLLM's EngineCore process (through loraplex's
vLLM plugin, which vLLM loads in each of its processes): it moves the EngineCore, and the
workers it starts afterwards, into a process group of their own, and asks the kernel to kill
it if the server process dies, so it is never left behind. The server stops it itself, after
draining (``AsyncLLM.shutdown`` in the app's lifespan). Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def is_engine_core() -> bool:
    """Whether this is vLLM's EngineCore process (named by vLLM when it starts it)."""
    return multiprocessing.current_process().name.startswith("EngineCore")


def detach_engine_core() -> None:
    """In the EngineCore only: own process group, and SIGKILL when the server dies."""
    if not sys.platform.startswith("linux") or not is_engine_core():
        return
    if os.getpgid(0) == os.getpid():  # already a group leader: nothing to leave
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        os.setpgid(0, 0)
    except OSError as exc:
        log.warning("the engine stays in the server's process group: %s", exc)
