"""What every child process the daemon or the demo starts does first: die with its parent and
step back from the CPU. One place for both rules, used by the cycle worker (worker.py), the engine
rebuild (engine_rebuild.py) and the demo's `edgetune serve` child (clients/demo.py). Torch-free."""
from __future__ import annotations

import os
import signal
from typing import Callable


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: the kernel sends `sig` to this process when its parent dies (even by SIGKILL), so no
    orphan keeps training, writing into a staging directory or holding a port. Elsewhere a no-op
    (callers that must also check, poll `os.getppid()`)."""
    parent_death_signal(sig)()


def parent_death_signal(sig: int) -> Callable[[], None]:
    """`die_with_parent(sig)` with libc looked up now: a `preexec_fn` for subprocess.Popen, which
    must not load libraries between fork and exec."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    return lambda: prctl(1, sig)  # PR_SET_PDEATHSIG


def start_child(nice: int, sig: int = signal.SIGKILL) -> None:
    """The first lines of a spawned child: die with the parent, then lower the priority by `nice`
    (best effort: a container may forbid it)."""
    die_with_parent(sig)
    try:
        os.nice(nice)
    except OSError:
        pass
