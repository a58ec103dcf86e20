"""Keep vLLM's engine processes out of the server's process group, and never orphaned.

A terminal's Ctrl-C (and a supervisor's process-group SIGTERM) reaches every process of the
group; vLLM's workers exit at once on it, which would abort requests the server is still
draining. ``detach_engine_process`` runs in each process vLLM starts (through loraplex's vLLM
plugin, which vLLM loads in each of its processes): the EngineCore moves into a process group
of its own, which the workers it starts afterwards inherit, and every such process asks the
kernel to kill it when its parent dies, so none is left behind when the server is killed.
The server stops them itself, after draining (``AsyncLLM.shutdown`` in the app's lifespan).
Linux only; elsewhere it does nothing.
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


def detach_engine_process() -> None:
    """In a process vLLM started: die with the parent; the EngineCore also leaves the group."""
    # The name is set before vLLM's objects are unpickled (when vLLM calls its plugins);
    # ``parent_process()`` is not yet.
    name = multiprocessing.current_process().name
    if not sys.platform.startswith("linux") or name == "MainProcess":
        return  # the server process itself, or not Linux
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if name.startswith("EngineCore") and os.getpgid(0) != os.getpid():
            os.setpgid(0, 0)
    except OSError as exc:
        log.warning("could not detach the engine process from the server's group: %s", exc)
